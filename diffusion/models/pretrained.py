"""diffusers ModelMixin + ConfigMixin base of the project's networks: `save_pretrained` / `from_pretrained`.

    net.save_pretrained(d)                      # d/config.json + d/diffusion_pytorch_model.safetensors
    net = DiT.from_pretrained(d)                # one call: config -> network -> weights
    net = DiT.from_pretrained(run, subfolder="transformer_ema")
    net = load_pretrained(run / "transformer_ema")   # the class named in config.json

diffusers does the saving and loading; this adds what it leaves open: only local directories are read (no hub
look-up), pickle weights (`.bin`) are refused unless `allow_pickle=True`, and weights that do not fit the config
(missing, unexpected or differently shaped tensors, which diffusers would re-initialise or skip with a warning)
raise an error naming the directory and the tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin

__all__ = ["PretrainedModel", "load_pretrained", "MODEL_CLASSES", "pickle_refusal", "mismatch_error", "CONFIG_NAME",
           "WEIGHTS_NAME", "PICKLE_WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"


def pickle_refusal(path) -> ValueError:
    """The error for a pickle weights file opened without `allow_pickle=True`."""
    return ValueError(f"refusing to unpickle {path}: pickle checkpoints can run arbitrary code. Convert it to "
                      f".safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)")


def _variant(name: str, variant: Optional[str]) -> str:
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}" if variant else name


def _preview(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} total)" if len(keys) > n else "")


def mismatch_error(source, model_name: str, missing=(), unexpected=(), shapes=()) -> Optional[RuntimeError]:
    """RuntimeError listing missing / unexpected keys and shape mismatches, or None when there are none."""
    if not (missing or unexpected or shapes):
        return None
    parts = [f"checkpoint {source} does not match the {model_name} state dict:"]
    if missing:
        parts.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_preview(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {'; '.join(shapes[:5])}")
    return RuntimeError("\n  ".join(parts))


def _safetensors_shapes(files) -> dict:
    """{name: shape} from the headers of safetensors files (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


MODEL_CLASSES: dict = {}  # class name -> PretrainedModel subclass (filled as subclasses are defined)


class PretrainedModel(ModelMixin, ConfigMixin):
    """ModelMixin + ConfigMixin with strict, local, pickle-free `from_pretrained` (subclasses decorate their
    `__init__` with `register_to_config`). `config_class_names` lists other `_class_name`s whose directories
    hold the same config and weights layout (ControlNet reads diffusers' ControlNetModel)."""

    config_name = CONFIG_NAME
    config_class_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODEL_CLASSES[cls.__name__] = cls

    def to(self, *args, **kwargs):
        """torch's Module.to: diffusers 0.42's ModelMixin.to logs "modules that should be kept in float32: []" on
        every dtype cast, also when there are none (as here)."""
        if not self._keep_in_fp32_modules:
            return torch.nn.Module.to(self, *args, **kwargs)
        return super().to(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None,
                        allow_pickle: bool = False, **kwargs):
        """Build the network from `config.json` of a local directory and load its weights strictly.

        Args:
            pretrained_model_name_or_path: a directory written by `save_pretrained` (or by diffusers).
            subfolder: a folder inside it, e.g. "transformer_ema" of a training run.
            allow_pickle: also read `diffusion_pytorch_model.bin` (torch.load(weights_only=True)).
            **kwargs: diffusers' `from_pretrained` options (torch_dtype, variant, device_map, ...).
        """
        d = Path(pretrained_model_name_or_path) / (subfolder or "")
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: {cls.__name__}.from_pretrained reads a local directory "
                                    f"written by save_pretrained ({CONFIG_NAME} + {WEIGHTS_NAME})")
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); re-export the model") from None
        name = config.get("_class_name", cls.__name__)
        if name not in (cls.__name__, *cls.config_class_names):
            raise ValueError(f"{cfg_path} describes a {name}, not a {cls.__name__}: load it with {name}")
        variant = kwargs.get("variant")
        index = d / _variant(WEIGHTS_NAME + ".index.json", variant)  # diffusers: ...safetensors.index.<variant>.json
        single = d / _variant(WEIGHTS_NAME, variant)
        if index.is_file():
            files = [d / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        elif single.is_file():
            files = [single]
        elif (d / _variant(PICKLE_WEIGHTS_NAME, variant)).is_file():
            if not allow_pickle:
                raise pickle_refusal(d / _variant(PICKLE_WEIGHTS_NAME, variant))
            files = None
        else:
            raise FileNotFoundError(f"no {single.name} in {d} (next to {CONFIG_NAME}); the export is incomplete")
        if files is not None:  # header check before diffusers builds and fills the network
            cls._check_files(config, files, d)
        kwargs.setdefault("local_files_only", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                              use_safetensors=None if allow_pickle else True,
                                              output_loading_info=True, **kwargs)
        err = mismatch_error(d, cls.__name__, info["missing_keys"], info["unexpected_keys"])
        if err is not None:
            raise err
        return model

    @classmethod
    def _check_files(cls, config: dict, files, source) -> None:
        """Tensor names and shapes in the safetensors headers == those of the network `config` describes."""
        from accelerate import init_empty_weights

        with init_empty_weights():  # meta tensors: no memory, no init
            own = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
        saved = _safetensors_shapes(files)
        shapes = [f"{k}: checkpoint {saved[k]} vs model {own[k]}" for k in sorted(set(own) & set(saved))
                  if saved[k] != own[k]]
        err = mismatch_error(files[0] if len(files) == 1 else source, cls.__name__, set(own) - set(saved),
                             set(saved) - set(own), shapes)
        if err is not None:
            raise err


def load_pretrained(path, subfolder: Optional[str] = None, allow_pickle: bool = False, **kwargs):
    """One call for any saved network: the class named by ``config.json``'s ``_class_name`` (DiT, MMDiT, a
    DiTControlNet once ``controlnet`` is imported, or a diffusers model such as SD3Transformer2DModel), then its
    ``from_pretrained``. E.g. ``load_pretrained(output_dir / "transformer_ema")`` after train_rf_dit."""
    import diffusers

    cfg_path = Path(path) / (subfolder or "") / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a directory written by save_pretrained")
    name = json.loads(cfg_path.read_text()).get("_class_name")
    if name in MODEL_CLASSES:
        return MODEL_CLASSES[name].from_pretrained(path, subfolder=subfolder, allow_pickle=allow_pickle, **kwargs)
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"{cfg_path}: _class_name {name!r} is neither one of {sorted(MODEL_CLASSES)} nor a diffusers "
                         f"model; import the module that defines it (e.g. controlnet) or call its from_pretrained")
    kwargs.setdefault("local_files_only", True)
    return cls.from_pretrained(path, subfolder=subfolder, use_safetensors=None if allow_pickle else True, **kwargs)

"""Checks of a Stable Diffusion pipeline directory and a ControlNet directory before any weights load.

cn-sample's exit-2 contract: every problem raises ValueError naming the file and what is wrong with it (missing,
empty, truncated or not a safetensors file, JSON that does not parse, a config value of the wrong type, weights that
do not fit their config, tokenizer files that disagree). Only file headers are read; the networks are built on the
meta device (no memory, no weights) to get the tensor names and shapes their configs imply.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import Callable, Optional

__all__ = ["read_json", "check_config_types", "safetensors_shapes", "weights_files", "check_weights",
           "check_tokenizer", "check_config_values", "check_pipeline_files", "check_controlnet_files"]

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
CORRUPT = "the file is corrupt or truncated; copy or re-save it"


def read_json(path: Path, fix: str = "") -> dict:
    """The JSON object in `path`; ValueError naming the file when it is missing, empty, binary or not an object."""
    if not path.is_file():
        raise ValueError(f"{path} not found{'; ' + fix if fix else ''}")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes); {CORRUPT}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not text (binary data where JSON is expected); {CORRUPT}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {CORRUPT}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object; {CORRUPT}")
    return obj


def _fits(value, default) -> bool:
    """Does a config value have the kind of its default (numbers may be per-block lists, None is always allowed)?"""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if number(default):
        return number(value) or (isinstance(value, (list, tuple)) and all(number(v) for v in value))
    if isinstance(default, str):
        return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
    if isinstance(default, (list, tuple)) and default:  # per-block lists; a single value is allowed too
        return all(_fits(v, default[0]) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return True


def check_config_types(cfg: dict, defaults: dict, path: Path) -> None:
    """ValueError naming the key when a value has another kind than the loader's default (e.g. "two" for an int)."""
    for key, value in cfg.items():
        if not key.startswith("_") and key in defaults and not _fits(value, defaults[key]):
            raise ValueError(f"{path}: {key} = {value!r} has the wrong type (expected a value like the default "
                             f"{defaults[key]!r}); fix the value in the file")


def _signature_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def safetensors_shapes(path: Path) -> dict:
    """{name: shape} from a safetensors header, checking that the file holds every byte the header promises."""
    if not path.is_file():
        raise ValueError(f"{path} not found")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes); {CORRUPT}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 2 <= n <= min(size - 8, 100 * 2 ** 20):
            raise ValueError(f"{path} is not a safetensors file (its first 8 bytes give a {n}-byte header in a "
                             f"{size}-byte file); {CORRUPT}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON); {CORRUPT}") from None
    shapes, end = {}, 0
    for name, info in (header.items() if isinstance(header, dict) else [("", None)]):
        if name == "__metadata__":
            continue
        try:
            (begin, stop), shape, dtype = info["data_offsets"], tuple(info["shape"]), info["dtype"]
            ok = stop - begin == math.prod(shape) * ITEMSIZE[dtype] and begin >= 0
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path} is not a valid safetensors file (bad header entry {name!r}); {CORRUPT}")
        shapes[name], end = shape, max(end, stop)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                         f"{CORRUPT}")
    return shapes


def weights_files(d: Path, stem: str, pickle_name: str) -> Optional[list]:
    """Safetensors weights of a component directory (sharded or not); None for a legacy pickle file only."""
    index = d / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise ValueError(f"{index} has no weight_map; {CORRUPT}")
        return [d / s for s in sorted(set(shards.values()))]
    if (d / f"{stem}.safetensors").is_file():
        return [d / f"{stem}.safetensors"]
    if (d / pickle_name).is_file():
        return None
    raise ValueError(f"{d / (stem + '.safetensors')} not found: the weights of {d.name}/ are missing")


def check_weights(files: Optional[list], build: Callable, config_path: Path, legacy_ok: Callable = None,
                  prefix: str = "") -> None:
    """Every parameter of the meta-built model must be in the files, with its shape (a leading `prefix` of the
    saved names that the model's own names lack is dropped, as the loader does)."""
    if files is None:
        return
    saved = {}
    for f in files:
        saved.update(safetensors_shapes(f))
    import torch

    try:
        with torch.device("meta"):
            model = build()
    except Exception as e:  # noqa: BLE001 - any failure to build is a config problem
        raise ValueError(f"{config_path}: cannot build the network it describes ({type(e).__name__}: {e}); "
                         f"fix the config") from None
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
    if prefix and not any(k.startswith(prefix) for k in expected):
        saved = {k.removeprefix(prefix): shape for k, shape in saved.items()}
    legacy = legacy_ok(saved) if legacy_ok else (lambda k: False)
    missing = [k for k in expected if k not in saved and not legacy(k)]
    wrong = [f"{k}: file {saved[k]} vs config {expected[k]}" for k in expected if k in saved and saved[k] != expected[k]]
    if missing or wrong:
        name = files[0] if len(files) == 1 else files[0].parent
        parts = ([f"{len(missing)} of {len(expected)} weights missing (e.g. {', '.join(missing[:3])})"] if missing
                 else []) + ([f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:2])})"] if wrong else [])
        raise ValueError(f"{name} does not fit {config_path}: {', '.join(parts)}; the weights belong to another "
                         f"model or config")


def check_tokenizer(d: Path, max_positions: Optional[int]) -> dict:
    """CLIP tokenizer files: vocab ids are integers, every merge line is a pair whose result is in the vocab and
    every merged vocab entry comes from a merge (a truncated merges.txt fails), model_max_length fits the encoder."""
    vocab_path, merges_path, cfg_path = d / "vocab.json", d / "merges.txt", d / "tokenizer_config.json"
    vocab = read_json(vocab_path)
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{vocab_path}: token ids must be integers, got {bad[0]!r}: {vocab[bad[0]]!r}; {CORRUPT}")
    if not merges_path.is_file():
        raise ValueError(f"{merges_path} not found; the CLIP tokenizer needs vocab.json and merges.txt")
    try:
        text = merges_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{merges_path} is not UTF-8 text; {CORRUPT}") from None
    lines = text.strip().split("\n")[1: 49152 - 256 - 2 + 1]  # the lines CLIPTokenizer reads (after "#version")
    produced = set()
    for i, line in enumerate(lines, start=2):
        pair = line.split()
        if len(pair) != 2 or pair[0] + pair[1] not in vocab:
            raise ValueError(f"{merges_path}, line {i}: {line[:40]!r} is not a merge of two symbols whose result is "
                             f"in vocab.json; {CORRUPT}")
        produced.add(pair[0] + pair[1])
    base = lambda t: len(t) == 1 or (len(t) == 5 and t.endswith("</w>")) or t.startswith("<|")  # noqa: E731
    orphans = [t for t in vocab if t not in produced and not base(t)]
    if orphans:
        raise ValueError(f"{merges_path} has {len(lines)} merges, but {len(orphans)} merged tokens of vocab.json come "
                         f"from none of them (e.g. {orphans[0]!r}): merges.txt is empty, truncated or from another "
                         f"tokenizer")
    cfg = read_json(cfg_path, "it sets model_max_length (the prompt length the text encoder takes)")
    if (d / "special_tokens_map.json").is_file():
        read_json(d / "special_tokens_map.json")
    n = cfg.get("model_max_length")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (max_positions and n > max_positions):
        raise ValueError(f"{cfg_path}: model_max_length = {n!r} must be an integer in [1, {max_positions}] "
                         f"(the text encoder's max_position_embeddings)")
    return cfg


def _legacy_vae_attention(saved: dict) -> Callable:
    """diffusers converts old VAE attention names (query/key/value/proj_attn) on load: do not ask for new ones."""
    old = any(k.endswith(("query.weight", "proj_attn.weight")) for k in saved)
    return lambda k: old and ".attentions." in k


def check_config_values(m: Path, c: Path, cfgs: dict) -> None:
    """Value kinds of the unet, vae, text encoder, scheduler and ControlNet configs (no weights read)."""
    import diffusers
    from transformers import CLIPTextConfig

    from .config import ControlNetConfig

    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        check_config_types(cfgs[sub], _signature_defaults(cls), m / sub / "config.json")
    check_config_types(cfgs["text_encoder"], CLIPTextConfig().to_dict(), m / "text_encoder" / "config.json")
    cls = getattr(diffusers, str(cfgs["scheduler"].get("_class_name")), None)
    if isinstance(cls, type):
        check_config_types(cfgs["scheduler"], _signature_defaults(cls), m / "scheduler" / "scheduler_config.json")
    check_config_types(cfgs["controlnet"], {f.name: f.default for f in dataclasses.fields(ControlNetConfig)},
                       c / "config.json")


def check_pipeline_files(m: Path, cfgs: dict) -> None:
    """Weights (headers, names, shapes against the config), tokenizer and schedule of a pipeline directory."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion import prediction_from_diffusers, schedule_from_diffusers

    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        path = m / sub / "config.json"
        check_weights(weights_files(m / sub, "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                      lambda cls=cls, sub=sub: cls.from_config(cfgs[sub]), path,
                      _legacy_vae_attention if sub == "vae" else None)
    path = m / "text_encoder" / "config.json"
    try:
        te_config = CLIPTextConfig.from_dict(cfgs["text_encoder"])
    except Exception as e:  # noqa: BLE001 - transformers' own validation
        raise ValueError(f"{path}: not a valid CLIP text encoder config ({type(e).__name__}: {e})") from None
    check_weights(weights_files(m / "text_encoder", "model", "pytorch_model.bin"), lambda: CLIPTextModel(te_config),
                  path, prefix="text_model.")  # transformers 5 drops the prefix older files have
    check_tokenizer(m / "tokenizer", te_config.max_position_embeddings)
    path = m / "scheduler" / "scheduler_config.json"
    try:
        schedule_from_diffusers(cfgs["scheduler"]), prediction_from_diffusers(cfgs["scheduler"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read the noise schedule from it ({type(e).__name__}: {e})") from None


def check_controlnet_files(c: Path, cfg: dict) -> None:
    """ControlNet config (buildable) and weights (headers, names, shapes against the config)."""
    from .config import ControlNetConfig
    from .model import ControlNet

    path = c / "config.json"
    try:
        config = ControlNetConfig.from_dict(cfg)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a valid ControlNet config ({type(e).__name__}: {e})") from None
    files = weights_files(c, "diffusion_pytorch_model", "diffusion_pytorch_model.bin")
    check_weights(files, lambda: ControlNet.from_config(config), path)

"""Pipeline families for cn-sample: SD 1.x / 2.x, SDXL and SD3 directories, told apart by model_index.json.

`pipeline_family(dir)` reads `_class_name` (StableDiffusionPipeline / StableDiffusionXLPipeline /
StableDiffusion3Pipeline; without model_index.json, the folders decide: transformer/ -> SD3, text_encoder_2/ ->
SDXL, else SD). For SDXL and SD3 `family_configs` and `check_family_files` are cn-sample's checks before any weights
load (the SD ones live in controlnet.cli / controlnet.preflight): every config readable with values of the right
kind, base parts and ControlNet that fit together, weights headers, names and shapes, tokenizers and the schedule;
each problem raises ValueError naming the file and the fix.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["FAMILIES", "CONTROLNET_CLASSES", "pipeline_family", "pipeline_class", "family_configs",
           "check_family_files", "sdxl_base_mismatches"]

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
CONTROLNET_CLASSES = {"sd": "ControlNetModel", "sdxl": "ControlNetModel", "sd3": "SD3ControlNetModel"}
TEXT_PARTS = {"sdxl": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2")}
FIX_MODEL = ("pass --model DIR, a local diffusers pipeline directory (StableDiffusionPipeline, "
             "StableDiffusionXLPipeline or StableDiffusion3Pipeline layout, with model_index.json)")


def pipeline_family(model) -> str:
    """'sd', 'sdxl' or 'sd3' from model_index.json's _class_name (or, without that file, from the folders)."""
    from .preflight import read_json

    m = Path(model)
    if not (m / "model_index.json").is_file():
        return "sd3" if (m / "transformer").is_dir() else "sdxl" if (m / "text_encoder_2").is_dir() else "sd"
    name = read_json(m / "model_index.json", FIX_MODEL).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{m / 'model_index.json'}: _class_name {name!r} is not a supported pipeline; valid: "
                         f"{', '.join(FAMILIES)}; {FIX_MODEL}")
    return FAMILIES[name]


def pipeline_class(model):
    """The ControlNet pipeline class for a directory's family."""
    family = pipeline_family(model)
    if family == "sdxl":
        from .pipeline_sdxl import SDXLControlNetPipeline
        return SDXLControlNetPipeline
    if family == "sd3":
        from .pipeline_sd3 import SD3ControlNetPipeline
        return SD3ControlNetPipeline
    from .pipeline import ControlNetPipeline
    return ControlNetPipeline


def _fix_controlnet(family: str) -> str:
    return (f"pass --controlnet DIR, a diffusers {CONTROLNET_CLASSES[family]} directory (config.json + "
            f"diffusion_pytorch_model.safetensors) trained for this {family.upper()} base model")


def _mismatch(pairs) -> list[str]:
    return [f"{name}: {a} vs {b}" for name, a, b in pairs if a is not None and b is not None and a != b]


def family_configs(family: str, m: Path, c: Path) -> dict:
    """Configs of an SDXL / SD3 directory and its ControlNet, their value kinds and their fit (no weights read)."""
    import diffusers
    from transformers import CLIPTextConfig, T5Config

    from .preflight import check_config_types, read_json, _signature_defaults

    backbone = "unet" if family == "sdxl" else "transformer"
    t5 = family == "sd3" and (m / "text_encoder_3").is_dir()
    parts = [backbone, "vae", *TEXT_PARTS[family], *(["text_encoder_3"] if t5 else [])]
    for sub in [*parts, "scheduler", "tokenizer", "tokenizer_2", *(["tokenizer_3"] if t5 else [])]:
        if not (m / sub).is_dir():
            raise ValueError(f"--model {m} has no {sub}/ folder, which a {family.upper()} pipeline needs; {FIX_MODEL}")
    cfgs = {sub: read_json(m / sub / "config.json", FIX_MODEL) for sub in parts}
    cfgs["scheduler"] = read_json(m / "scheduler" / "scheduler_config.json", FIX_MODEL)
    fix = _fix_controlnet(family)
    if not c.is_dir():
        raise ValueError(f"--controlnet {c} is not a directory; {fix}")
    want = CONTROLNET_CLASSES[family]
    if not (c / "config.json").is_file():
        subs = [p.parent for p in sorted([*c.glob("*/config.json"), *c.glob("*/*/config.json")])
                if _class_name(p) == want]
        if subs:
            raise ValueError(f"--controlnet {c} has no config.json, but its subfolder {subs[0]} holds a {want}; "
                             f"pass --controlnet {subs[0]}")
    cn = cfgs["controlnet"] = read_json(c / "config.json", fix)
    if cn.get("_class_name", want) != want:
        raise ValueError(f"--controlnet {c} holds a {cn['_class_name']}, but a {family.upper()} base takes a {want}; "
                         f"{fix}")
    classes = {backbone: getattr(diffusers, "UNet2DConditionModel" if family == "sdxl" else "SD3Transformer2DModel"),
               "vae": diffusers.AutoencoderKL, "controlnet": getattr(diffusers, want)}
    for sub, cls in classes.items():
        where = c / "config.json" if sub == "controlnet" else m / sub / "config.json"
        check_config_types(cfgs[sub], _signature_defaults(cls), where)
    for sub in TEXT_PARTS[family]:
        check_config_types(cfgs[sub], CLIPTextConfig().to_dict(), m / sub / "config.json")
    if t5:
        check_config_types(cfgs["text_encoder_3"], T5Config().to_dict(), m / "text_encoder_3" / "config.json")
    sched = getattr(diffusers, str(cfgs["scheduler"].get("_class_name")), None)
    if isinstance(sched, type):
        check_config_types(cfgs["scheduler"], _signature_defaults(sched), m / "scheduler" / "scheduler_config.json")

    b, vae, te1, te2 = cfgs[backbone], cfgs["vae"], cfgs["text_encoder"], cfgs["text_encoder_2"]
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    width = lambda *cfg: sum(x.get("hidden_size") or 0 for x in cfg) or None  # noqa: E731
    proj = lambda *cfg: sum(x.get("projection_dim") or 0 for x in cfg) or None  # noqa: E731
    if family == "sdxl":
        base = sdxl_base_mismatches(b, vae, te1, te2)
        keys = ("in_channels", "block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim")
        hint = 2 ** (len(cn.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
        diff = _mismatch([(k, _norm(cn.get(k)), _norm(b.get(k))) for k in keys])
        diff += _mismatch([("condition downscale vs VAE factor", hint, vae_factor)])
    else:
        te3 = cfgs.get("text_encoder_3", {})
        base = _mismatch([
            ("transformer in_channels vs vae latent_channels", b.get("in_channels"), vae.get("latent_channels")),
            ("transformer pooled_projection_dim vs the CLIP projection_dims summed", b.get("pooled_projection_dim"),
             proj(te1, te2)),
            ("transformer joint_attention_dim vs text_encoder_3 d_model", b.get("joint_attention_dim"),
             te3.get("d_model"))])
        if (width(te1, te2) or 0) > (b.get("joint_attention_dim") or 1 << 30):
            base.append(f"CLIP hidden sizes summed {width(te1, te2)} exceed joint_attention_dim "
                        f"{b.get('joint_attention_dim')}")
        keys = ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "pooled_projection_dim")
        diff = _mismatch([(k, cn.get(k), b.get(k)) for k in keys])
        if cn.get("joint_attention_dim") is not None:
            diff += _mismatch([("joint_attention_dim", cn["joint_attention_dim"], b.get("joint_attention_dim"))])
        if cn.get("extra_conditioning_channels"):
            diff.append(f"extra_conditioning_channels {cn['extra_conditioning_channels']} (cn-sample's condition "
                        f"latents have the VAE's latent channels only)")
    if base:
        raise ValueError(f"--model {m}: its parts do not fit together ({'; '.join(base)}); {FIX_MODEL}")
    if diff:
        raise ValueError(f"--controlnet {c} does not match --model {m} (mismatch: {'; '.join(diff)}); use a "
                         f"ControlNet trained for this base")
    multiple = vae_factor * (b.get("patch_size") or 1) if family == "sd3" else vae_factor
    return {**cfgs, "family": family, "vae_factor": vae_factor, "pixel_multiple": multiple}


def check_family_files(family: str, m: Path, c: Path, cfgs: dict) -> None:
    """Weights (headers, names, shapes against the configs), tokenizers and the schedule (no weights loaded)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffusion import prediction_from_diffusers, schedule_from_diffusers

    from .preflight import check_controlnet_files, check_tokenizer, check_weights, read_json, weights_files

    backbone = "unet" if family == "sdxl" else "transformer"
    built = {backbone: getattr(diffusers, "UNet2DConditionModel" if family == "sdxl" else "SD3Transformer2DModel"),
             "vae": diffusers.AutoencoderKL}
    for sub, cls in built.items():
        check_weights(weights_files(m / sub, "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                      lambda cls=cls, sub=sub: cls.from_config(cfgs[sub]), m / sub / "config.json")
    encoders = {"text_encoder": CLIPTextModel if family == "sdxl" else CLIPTextModelWithProjection,
                "text_encoder_2": CLIPTextModelWithProjection}
    if "text_encoder_3" in cfgs:
        encoders["text_encoder_3"] = T5EncoderModel
    for sub, cls in encoders.items():
        path = m / sub / "config.json"
        try:
            config = (T5Config if cls is T5EncoderModel else CLIPTextConfig).from_dict(cfgs[sub])
        except Exception as e:  # noqa: BLE001 - transformers' own validation
            raise ValueError(f"{path}: not a valid {cls.__name__} config ({type(e).__name__}: {e})") from None
        check_weights(weights_files(m / sub, "model", "pytorch_model.bin"), lambda cls=cls, config=config: cls(config),
                      path, prefix="text_model." if cls is CLIPTextModel else "")
        if cls is not T5EncoderModel:
            check_tokenizer(m / sub.replace("text_encoder", "tokenizer"), config.max_position_embeddings)
    if "text_encoder_3" in cfgs:
        read_json(m / "tokenizer_3" / "tokenizer.json", "the T5 tokenizer (tokenizer_3/) needs its tokenizer.json")
    path = m / "scheduler" / "scheduler_config.json"
    try:
        schedule_from_diffusers(cfgs["scheduler"]), prediction_from_diffusers(cfgs["scheduler"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read the noise schedule from it ({type(e).__name__}: {e})") from None
    if family == "sdxl":  # our ControlNet class loads SDXL ControlNetModel weights: the SD check
        return check_controlnet_files(c, cfgs["controlnet"])
    check_weights(weights_files(c, "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                  lambda: diffusers.SD3ControlNetModel.from_config(cfgs["controlnet"]), c / "config.json")


def sdxl_base_mismatches(unet: dict, vae: dict, te1: dict, te2: dict) -> list[str]:
    """How an SDXL base's configs (unet, vae, text_encoder, text_encoder_2) fail to fit together ([] if they fit)."""
    width = sum(x.get("hidden_size") or 0 for x in (te1, te2)) or None
    return _mismatch([
        ("unet in_channels vs vae latent_channels", unet.get("in_channels"), vae.get("latent_channels")),
        ("unet cross_attention_dim vs text encoders' hidden sizes summed", unet.get("cross_attention_dim"), width),
        ("unet addition_embed_type vs SDXL's", unet.get("addition_embed_type"), "text_time"),
        ("unet projection_class_embeddings_input_dim vs 6 x addition_time_embed_dim + text_encoder_2 "
         "projection_dim", unet.get("projection_class_embeddings_input_dim"),
         6 * (unet.get("addition_time_embed_dim") or 0) + (te2.get("projection_dim") or 0))])


def _class_name(config_file: Path):
    from .preflight import read_json

    try:
        return read_json(config_file).get("_class_name")
    except ValueError:
        return None


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v

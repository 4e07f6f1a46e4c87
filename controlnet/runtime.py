"""Where and in what precision a pipeline runs: device and dtype choice, model CPU offload, torch.compile, and the
settings record written next to cn-sample's images.

Precision follows diffusers: the networks (text encoders, UNet / transformer, ControlNets, VAE) run in the chosen
dtype, the sampler state (latents, time grid, solver history) stays float32 (ControlNetPipeline.denoiser casts x_t to
the network dtype and wrap_model casts the output back to x_t's float32).
"""
from __future__ import annotations

import platform
from typing import Optional, Union

import torch
from accelerate.hooks import UserCpuOffloadHook

__all__ = ["DEVICE_CHOICES", "DTYPES", "resolve_device", "resolve_dtype", "enable_model_cpu_offload",
           "compile_networks", "package_versions"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; an explicit device that this machine lacks is an error."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown --device {name!r}; valid: {', '.join(DEVICE_CHOICES)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available ({why}; torch {torch.__version__}); pass "
                             f"--device cpu, or --device auto to use the best device present")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1}); pass one of them")
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(f"--device {name}: Apple MPS is not available on this machine; pass --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported --device {name!r}; valid: {', '.join(DEVICE_CHOICES)}")
    return dev


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """fp32 / fp16 / bf16; None: fp16 on cuda and mps, fp32 on cpu (half-precision CPU kernels run, but slower than
    fp32 on most CPUs)."""
    if name is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name == "bf16" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype bf16: this GPU has no bfloat16 support; pass --dtype fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


class GroupOffloadHook(UserCpuOffloadHook):
    """accelerate's UserCpuOffloadHook over several models offloaded together (backbone + ControlNets)."""

    def __init__(self, hooks: list):
        super().__init__(hooks[0].model, hooks[0].hook)  # accelerate reads prev_module_hook.model's device
        self.hooks = hooks

    def offload(self):
        for h in self.hooks:
            h.offload()


def enable_model_cpu_offload(pipe, device: Union[str, torch.device] = "cuda") -> list:
    """Keep every network of `pipe` on the CPU and move it to `device` only while it is used (as diffusers'
    enable_model_cpu_offload): text encoders -> ControlNet(s) + backbone -> VAE, each group sent back to the CPU when
    the next one starts; pipe.free_model_hooks() (called at the end of every pipeline call) offloads all.
    Returns accelerate's hooks. Peak device memory: the largest group instead of the whole pipeline."""
    from accelerate import cpu_offload_with_hook

    device = torch.device(device)
    hooks, prev = [], None
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            _, prev = cpu_offload_with_hook(getattr(pipe, name), device, prev_module_hook=prev)
            hooks.append(prev)
    nets = pipe.controlnet if isinstance(pipe.controlnet, (list, tuple)) else \
        [] if pipe.controlnet is None else [pipe.controlnet]
    group = [cpu_offload_with_hook(n, device, prev_module_hook=prev)[1] for n in [pipe.backbone, *nets]]
    hooks += group
    hooks.append(cpu_offload_with_hook(pipe.vae, device, prev_module_hook=GroupOffloadHook(group))[1])
    pipe._offload_hooks, pipe._execution_device = hooks, device
    return hooks


def compile_networks(pipe, **options) -> None:
    """torch.compile (in place, nn.Module.compile) the denoiser's networks: the UNet / transformer and ControlNet(s);
    the first call compiles (slow), later calls with the same shapes reuse it."""
    if not hasattr(torch, "compile"):
        raise ValueError(f"--compile needs torch.compile (torch >= 2.0), this is torch {torch.__version__}")
    nets = pipe.controlnet if isinstance(pipe.controlnet, (list, tuple)) else \
        [] if pipe.controlnet is None else [pipe.controlnet]
    for net in [pipe.backbone, *nets]:
        net.compile(**options)


def package_versions() -> dict:
    """Versions of python, torch (and its CUDA), diffusers, transformers, accelerate and this project."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("diffusers", "transformers", "accelerate", "diffusion-controlnet"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out

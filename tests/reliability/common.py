"""Shared helpers of the reliability tests: trainer runs on tiny models, checkpoint trees, directory snapshots."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tests.controlnet.sd_fixtures import fill_data, tiny_sd  # noqa: F401  (also puts scripts/ on sys.path)

from diffusion.training import rf_dit as RF  # noqa: E402
from controlnet import t2i_training as T2I  # noqa: E402

from controlnet.training import TrainControlNetConfig  # noqa: E402


def rf_cfg(out, **kw) -> "RF.TrainConfig":
    base = dict(output_dir=str(out), model="DiT-Tiny/4", train_batch_size=8, max_train_steps=4, progress_bar=False, report_to="none",
                validation_steps=0, samples_per_class=1, validation_inference_steps=2, lr_warmup_steps=2, checkpointing_steps=1000,
                checkpoints_total_limit=None)
    return RF.TrainConfig(**{**base, **kw})


def cn_cfg(out, **kw) -> TrainControlNetConfig:
    base = dict(pretrained_model_name_or_path=str(tiny_sd()), train_data_dir=str(fill_data()), output_dir=str(out),
                resolution=32, train_batch_size=2, learning_rate=1e-3, lr_warmup_steps=0, report_to="none",
                logging_steps=1000, checkpointing_steps=1000, validation_steps=1000)
    return TrainControlNetConfig(**{**base, **kw})


def t2i_cfg(out, **kw) -> "T2I.TrainT2IConfig":
    base = dict(output_dir=str(out), train_data_dir=str(fill_data(32, 16)), resolution=16, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_heads=2, norm_num_groups=4,
                text_hidden_size=16, text_layers=1, max_length=8, vae_block_out_channels=(8, 8), vae_steps=2,
                vae_batch_size=4, train_batch_size=8, max_train_steps=3, lr_warmup_steps=0, checkpointing_steps=1000,
                checkpoints_total_limit=None, validation_steps=0, validation_inference_steps=1, validation_prompt=["red circle"],
                report_to="none", progress_bar=False, num_threads=None)
    return T2I.TrainT2IConfig(**{**base, **kw})


def reset_accelerate() -> None:
    """A clean accelerate singleton (for module-scoped fixtures that run trainers)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def argv_of(cfg) -> list[str]:
    """--key=value for every field of a trainer config that differs from its default: cfg as a command line."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        if d is dataclasses.MISSING or v != d:
            val = "none" if v is None else str(v).lower() if isinstance(v, bool) else \
                json.dumps(list(v)) if isinstance(v, (list, tuple)) else str(v)
            out.append(f"--{f.name}={val}")
    return out


class Exit2(Exception):
    """A trainer's main() exited with status 2; the message is what it printed on stderr."""


def exit2(main, argv):
    """Callable running main(argv) that raises Exit2(stderr) on exit status 2 and fails on anything else."""
    import contextlib
    import io

    def call():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as e:
                if e.code == 2:
                    raise Exit2(err.getvalue()) from None
                raise AssertionError(f"exit status {e.code}, not 2: {err.getvalue()}") from None
        raise AssertionError(f"no error: {err.getvalue()}")
    return call


def snapshot(root) -> dict:
    """{relative path: sha256} of every file under root ({} if absent): 'nothing changed on disk'."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load_file(p: Path):
    if p.suffix == ".safetensors":
        from diffusion.training.checkpoint import load_state
        return load_state(p)  # tensors, or the full state dict of a trainer object (LR scheduler, EMA)
    if p.suffix in (".pkl", ".bin"):
        return torch.load(p, weights_only=False)
    if p.suffix == ".json" and p.name != "manifest.json":  # the manifest names the run (its id differs per run)
        return json.loads(p.read_text())
    return None  # config.yaml etc.: not state


def checkpoint_state(ckpt) -> dict:
    """Every state file of a checkpoint (accelerate's model / optimizer / scheduler / EMA / RNG states, trainer
    weights and trainer_state.json) loaded into Python objects, keyed by relative path."""
    ckpt = Path(ckpt)
    out = {str(p.relative_to(ckpt)): _load_file(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
    return {k: v for k, v in out.items() if v is not None}


def assert_state_equal(a, b, where: str = "") -> None:
    """Recursive bitwise equality of nested dicts / lists / tensors / arrays."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), \
            f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: arrays differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

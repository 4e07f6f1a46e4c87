#!/usr/bin/env python
"""How closely a trained DiTControlNet run (scripts/train_dit_controlnet.py) follows its conditions, against the
untrained ControlNet (= the bare base), on held-out (image, condition, caption) rows:

    python scripts/eval_dit_controlnet.py --run outputs/dit_controlnet_fill16 --data_dir data/held16 [--num 64]

Prints the denoising loss at t = 0.5, 0.8 (4 noise draws) and the MSE of samples (flow_euler, seeds seed + i) to
the target images, per guidance scale, for the untrained and the trained (EMA when present) ControlNet.
"""
from __future__ import annotations

import argparse
import copy
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def evaluate(run, data_dir, num: int = 64, steps: int = 20, scales=(1.0, 2.0), seed: int = 5) -> dict:
    """{"untrained" | "trained": {"loss": float, "mse": {scale: float}}} on the first `num` rows of data_dir."""
    from controlnet.data import collate
    from controlnet.dit_controlnet import DiTControlNet
    from controlnet.dit_training import DiTControlNetTask, TrainDiTControlNetConfig
    from controlnet.training import build_dataset
    from diffusion.training.checkpoint import step_generator
    from diffusion.training.config import load_config
    from diffusion.training.loop import make_accelerator

    run = Path(run)
    cfg = load_config(TrainDiTControlNetConfig, run / "config.yaml")
    task = DiTControlNetTask(cfg)
    task.accelerator = make_accelerator(cfg)
    task.build()
    held = copy.copy(cfg)
    held.train_data_dir, held.dataset_name, held.data_files = str(data_dir), None, []
    ds = build_dataset(held)
    batch = collate([ds[i] for i in range(min(num, len(ds)))])
    x0, hint, texts = batch["pixel_values"], batch["conditioning_pixel_values"], batch["text"]
    if task.x_shape[0] == 1:
        x0 = x0.mean(1, keepdim=True)
    cond = task.conditioner({"x": x0, "text": texts, **({} if task.labels(texts) is None else
                                                        {"label": task.labels(texts)})})
    trained = run / "controlnet_ema" if (run / "controlnet_ema").is_dir() else run
    layers = task.controlled.controlnet.num_layers
    nets = {"untrained": DiTControlNet.from_transformer(task.controlled.transformer, layers, conditioning_channels=3),
            "trained": DiTControlNet.from_pretrained(trained)}
    out, t_eval = {}, (0.5, 0.8)
    for name, net in nets.items():
        net.eval()
        with torch.no_grad():
            loss = sum(task.loss_fn(partial(task.controlled_call, net), x0, generator=step_generator(9, k),
                                    t=torch.full((len(x0),), t, dtype=torch.float64), controlnet_cond=hint,
                                    **cond).item() for k in range(4) for t in t_eval) / (4 * len(t_eval))
        mse = {s: (task.sample(net, texts, hint, seed=seed, cfg_scale=s, steps=steps, sampler="flow_euler") - x0)
               .square().mean().item() for s in scales}
        out[name] = {"loss": loss, "mse": mse}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="output_dir of scripts/train_dit_controlnet.py")
    p.add_argument("--data_dir", required=True, help="held-out rows (fill50k / imagefolder layout)")
    p.add_argument("--num", type=int, default=64, help="rows to evaluate")
    p.add_argument("--steps", type=int, default=20, help="flow_euler steps")
    p.add_argument("--cfg_scale", type=float, nargs="+", default=[1.0, 2.0], help="guidance scales")
    a = p.parse_args(argv)
    for name, r in evaluate(a.run, a.data_dir, a.num, a.steps, a.cfg_scale).items():
        mse = ", ".join(f"CFG {s}: {v:.4f}" for s, v in r["mse"].items())
        print(f"{name}: denoising loss {r['loss']:.4f}; sample MSE {mse}")


if __name__ == "__main__":
    main()

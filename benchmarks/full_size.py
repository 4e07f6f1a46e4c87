"""Benchmark: SD1.5-size ControlNet (Zhang, Rao & Agrawala 2023) training step and cn-sample, ours vs diffusers.

    python benchmarks/full_size.py                       # SD1.5 shapes at 512 px on the CPU (~10 GB RAM, minutes)
    python benchmarks/full_size.py --device cuda --quick  # on a GPU: fp16 sampling, bf16 autocast training
    python benchmarks/full_size.py --size tiny           # the same code path at test size (seconds)

Builds random-weight SD1.5-shaped components here (UNet 320/640/1280/1280 with cross-attention 768, a 12-layer x 768
CLIP text encoder over a local BPE tokenizer, the SD VAE, the SD scheduler; nothing is downloaded) and writes them in
the diffusers layout to a temporary directory, with a ControlNet made from the UNet (its zero convolutions filled
with small random values so that the control path changes the images). Then, each in a fresh process (so that the
peak RSS, ru_maxrss, is the variant's own), side by side:

(a) train: ControlNet.from_unet + one training step (VAE-encoded 512 px image, text encoding, noise, ControlNet +
    frozen UNet, MSE on eps, backward, AdamW) with gradient checkpointing on the ControlNet, batch 1 (the time is
    both; CPU time over all steps) -- ours (controlnet.training.denoising_loss on ControlledUNet) vs diffusers'
    ControlNetModel.from_unet + UNet as in diffusers' examples/controlnet/train_controlnet.py; the same draws, so
    the losses must agree.
(b) sample: the cn-sample code path (controlnet.cli.load_pipeline, 2 DDIM steps on the trailing grid, CFG 7.5) vs
    diffusers' StableDiffusionControlNetPipeline (DDIMScheduler, trailing) on the same weights and latents; the
    images must agree within 1e-3 (fp32).

Reported: wall time and process CPU time (CPU time is less inflated by other processes on a shared machine), peak
RSS (and peak GPU memory on cuda), ratios ours / diffusers with PASS / FAIL against the targets (training <= 1.0x,
sampling <= 1.1x time and memory; images within 1e-3; the judged time is CPU time on the CPU, wall time on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # UNet / ControlNet, VAE, CLIP text encoder shapes; "full" is SD1.5's
    "full": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                           attention_head_dim=8, norm_num_groups=32),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 resolution=512),
    "tiny": dict(unet=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                           attention_head_dim=8, norm_num_groups=8),
                 vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 resolution=64),
}
PROMPT = "a red circle with a blue background"
TARGETS = {"train": 1.0, "sample": 1.1}
IMAGE_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}  # images in [0, 1]; half precision: kernel order differs


def build_components(root: Path, size: str = "full", seed: int = 0) -> Path:
    """SD1.5-layout pipeline directory (random weights) at root/base and its ControlNet at root/controlnet."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from controlnet import ControlNet
    from diffusion.models.tokenizer import BOS, EOS, write_clip_tokenizer

    s = SIZES[size]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=s["resolution"] // 8, in_channels=4, out_channels=4, **s["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=s["resolution"],
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215, **s["vae"])
    vocab = write_clip_tokenizer(root / "tok", PROMPT.split() + ["photo", "of", "edges"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, projection_dim=s["text"][
        "hidden_size"], bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], **s["text"]))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), unet=unet.eval(), scheduler=sched,
                                   tokenizer=CLIPTokenizer.from_pretrained(root / "tok"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "base", safe_serialization=True)
    write_clip_tokenizer(root / "base" / "tokenizer", PROMPT.split() + ["photo", "of", "edges"])
    cn = ControlNet.from_unet(unet)
    with torch.no_grad():  # small non-zero zero convs: the ControlNet's residuals change the images
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.normal_(0, 0.02)
    cn.save_pretrained(root / "controlnet")
    return root


def inputs(resolution: int, batch: int = 1):
    """Fixed condition / image / latents of a run (seeded): condition in [0, 1], image in [-1, 1]."""
    import torch

    g = torch.Generator().manual_seed(7)
    cond = torch.zeros(batch, 3, resolution, resolution)
    r = resolution // 4
    cond[:, :, r:-r, r:r + 2] = cond[:, :, r:-r, -r - 2:-r] = cond[:, :, r:r + 2, r:-r] = 1.0  # a square outline
    image = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=g)
    return cond, image, latents


# ---------------------------------------------------------------------------------------------- the variants
def sample_variant(variant: str, root: Path, device: str = "cpu", dtype: str = "fp32") -> dict:
    """(b): load, then 2 DDIM trailing steps with CFG 7.5 at the model's size; images as a (B, H, W, 3) array."""
    import torch

    from controlnet.runtime import DTYPES

    res = json.loads((root / "base" / "vae" / "config.json").read_text())["sample_size"]
    cond, _, latents = inputs(res)
    kw = dict(guidance_scale=7.5, latents=latents, output_type="np", height=res, width=res)
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "ours":
        from controlnet.cli import load_pipeline
        pipe = load_pipeline(root / "base", root / "controlnet", device, DTYPES[dtype])
        load = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        images = pipe(PROMPT, cond, sampler="ddim", steps=2, time_grid="trailing", **kw).images
    else:
        from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
        kw_load = dict(torch_dtype=DTYPES[dtype], local_files_only=True)
        net = ControlNetModel.from_pretrained(root / "controlnet", **kw_load)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            root / "base", controlnet=net, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **kw_load).to(device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        load = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            images = pipe(PROMPT, image=cond, num_inference_steps=2, **kw).images
    _sync(device)
    return {"images": images, "load_s": load, "wall_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c1}


def train_variant(variant: str, root: Path, device: str = "cpu", dtype: str = "fp32", batch: int = 1,
                  steps: int = 1) -> dict:
    """(a): ControlNet from the UNet, then `steps` training steps (the same draws for both variants)."""
    import torch
    import torch.nn.functional as F

    from controlnet.pipeline import load_components
    from controlnet.runtime import DTYPES

    c = load_components(root / "base", device=device)
    res = c["vae"].config.sample_size
    cond, image, _ = inputs(res, batch)
    data = {"text": [PROMPT] * batch, "pixel_values": image, "conditioning_pixel_values": cond}
    autocast = torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "ours":
        from controlnet import ControlledUNet, ControlNet
        from controlnet.pipeline import ControlNetPipeline
        from controlnet.training import denoising_loss
        net = ControlNet.from_unet(c["unet"]).to(device).train()
        net.enable_gradient_checkpointing()
        pipe = ControlNetPipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
        model = ControlledUNet(c["unet"], net)

        def loss_fn(g):
            with autocast:
                return denoising_loss(pipe, model, data, g)
    else:
        from diffusers import ControlNetModel, DDPMScheduler
        net = ControlNetModel.from_unet(c["unet"]).to(device).train()
        net.enable_gradient_checkpointing()
        unet, vae, text = c["unet"].requires_grad_(False), c["vae"].requires_grad_(False), c["text_encoder"]
        text.requires_grad_(False)
        noise_scheduler = DDPMScheduler.from_config(c["scheduler_config"])
        ids = c["tokenizer"](data["text"], padding="max_length", max_length=c["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)

        def loss_fn(g):  # diffusers' examples/controlnet/train_controlnet.py, with our draw order
            torch.rand(batch, generator=g)  # (caption dropout draw of denoising_loss)
            with torch.no_grad():
                x0 = vae.encode(data["pixel_values"].to(device)).latent_dist.sample(g) * vae.config.scaling_factor
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.randint(0, 1000, (batch,), generator=g).to(device)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            with autocast:
                ehs = text(ids)[0]
                down, mid = net(noisy, t, ehs, controlnet_cond=data["conditioning_pixel_values"].to(device),
                                return_dict=False)
                pred = unet(noisy, t, ehs, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0]
            return F.mse_loss(pred.float(), noise.float())
    made = time.perf_counter() - t0
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    losses, grad_norms, times = [], [], []
    for i in range(steps):
        t1 = time.perf_counter()
        loss = loss_fn(torch.Generator().manual_seed(i))
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        _sync(device)
        times.append(time.perf_counter() - t1)
    return {"loss": losses, "grad_norm": grad_norms, "from_unet_s": made, "wall_s": made + times[0],
            "cpu_s": time.process_time() - c0, "it_s": (len(times) - 1) / sum(times[1:]) if steps > 1 else None}


def _sync(device: str) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the runner
def worker(a) -> None:
    """In a fresh process: one variant; prints its figures as JSON (images saved next to the components)."""
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    root = Path(a.root)
    if a.task == "sample":
        out = sample_variant(a.worker, root, a.device, a.dtype)
        np.save(root / f"images_{a.worker}.npy", out.pop("images"))
    else:
        out = train_variant(a.worker, root, a.device, "bf16" if a.dtype != "fp32" else "fp32", a.batch, a.train_steps)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.device(a.device).type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(out))


def run_worker(task: str, variant: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--task", task, "--root", str(a.root), "--device", a.device,
           "--dtype", a.dtype, "--threads", str(a.threads), "--batch", str(a.batch), "--train_steps",
           str(a.train_steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{task} / {variant} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: dict, image_diff: float, image_std: float, device: str, dtype: str = "fp32") -> tuple[str, bool]:
    """The printed table and whether every target holds."""
    time_key = "cpu_s" if device == "cpu" else "wall_s"
    mem_key = "peak_rss_mib" if device == "cpu" else "peak_gpu_mib"
    rows, ok = [], True
    head = f"| task | variant | wall s | CPU s | peak RSS MiB | peak GPU MiB | ratio {time_key} | ratio mem | verdict |"
    rows += [head, "|" + "---|" * 9]
    for task in ("train", "sample"):
        ours, ref = results[task]["ours"], results[task]["diffusers"]
        rt, rm = ours[time_key] / ref[time_key], ours[mem_key] / ref[mem_key]
        good = rt <= TARGETS[task] and rm <= TARGETS[task]
        ok &= good
        for name, r in (("ours", ours), ("diffusers", ref)):
            gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
            tail = f"{rt:.3f} | {rm:.3f} | {'PASS' if good else 'FAIL'} (<= {TARGETS[task]})" if name == "ours" \
                else "| |"
            rows.append(f"| {task} | {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mib']:.0f} | {gpu} | "
                        f"{tail} |")
    tr = results["train"]
    loss_diff = abs(tr["ours"]["loss"][0] - tr["diffusers"]["loss"][0])
    good_img = image_diff <= IMAGE_TOL[dtype]
    ok &= good_img
    rows.append(f"\nimages: max |ours - diffusers| = {image_diff:.2e} (image std {image_std:.3f}) "
                f"{'PASS' if good_img else 'FAIL'} (<= {IMAGE_TOL[dtype]}); "
                f"training loss ours {tr['ours']['loss'][0]:.6f} "
                f"vs diffusers {tr['diffusers']['loss'][0]:.6f} (|diff| {loss_diff:.2e})")
    for name in ("ours", "diffusers"):
        if tr[name].get("it_s"):
            rows.append(f"training throughput {name}: {tr[name]['it_s']:.3f} it/s (batch {tr[name].get('batch', '')})")
    return "\n".join(rows), ok


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="full", help="component shapes (full: SD1.5 at 512 px)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="sampling precision (default: "
                   "fp32 on cpu, fp16 on cuda); training uses bf16 autocast when it is not fp32")
    p.add_argument("--quick", action="store_true", help="GPU check: batch 4 and 6 training steps (throughput)")
    p.add_argument("--batch", type=int, default=1, help="training batch")
    p.add_argument("--train_steps", type=int, default=1, help="training steps (it/s from the 2nd on)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per variant")
    p.add_argument("--diffusers_first", action="store_true", help="run diffusers' variant before ours (order check)")
    p.add_argument("--root", default=None, help="existing component directory (default: built in a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("fp32" if a.device == "cpu" else "fp16")
    if a.worker:
        return worker(a)
    if a.quick:
        a.batch, a.train_steps = 4, 6
    tmp = None
    if a.root is None:
        tmp = tempfile.TemporaryDirectory(prefix="full_size_")
        a.root = Path(tmp.name)
        t0 = time.perf_counter()
        build_components(a.root, a.size)
        print(f"built {a.size} components in {a.root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    import numpy as np

    results = {"train": {}, "sample": {}}
    for task in ("train", "sample"):
        for variant in ("diffusers", "ours") if a.diffusers_first else ("ours", "diffusers"):
            results[task][variant] = r = run_worker(task, variant, a)
            r["batch"] = a.batch
            print(f"{task} {variant}: {json.dumps(r)}", flush=True)
    ours, ref = (np.load(Path(a.root) / f"images_{v}.npy") for v in ("ours", "diffusers"))
    diff, std = float(np.abs(ours - ref).max()), float(ref.std())
    text, ok = table(results, diff, std, a.device, a.dtype)
    print(f"\nfull_size ({a.size}, {a.device}, sampling {a.dtype}, torch threads {a.threads})\n{text}")
    print("ALL TARGETS PASS" if ok else "SOME TARGETS FAIL")
    if tmp is not None:
        tmp.cleanup()
    return {"results": results, "image_diff": diff, "ok": ok}


if __name__ == "__main__":
    main()

"""Benchmark: ControlNet (Zhang, Rao & Agrawala 2023) training step and inference overhead, ours vs diffusers.

    python benchmarks/controlnet_step.py [--steps 6] [--infer-rounds 24] [--threads 1] [--latent 32] [--batch 2]

Same run, same SD-like tiny UNet (4 levels, 2 layers per level, cross-attention in 3 levels), same weights.
Training step = ControlNet forward + frozen-UNet forward with residuals + MSE(eps) backward + AdamW step on
the ControlNet only. Timings alternate ours/diffusers step by step (the order flips every round) so that
load from other processes hits both alike. Reported: median wall time per call and median process CPU time
per call (``time.process_time``; with one thread it is what the step costs, and unlike wall time it is not
inflated when other processes compete for the cores).

Memory: torch's CPU allocator is not instrumented (tracemalloc does not see it), so each variant runs in a
fresh subprocess that does one warm-up step (weights, grads and AdamW state then exist), resets the kernel's
peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` over the next steps:
the extra resident memory a step needs. glibc is made to return freed memory (fixed
``MALLOC_MMAP_THRESHOLD_`` + ``malloc_trim``) so that RSS follows the live tensors rather than the heap's history. A second, allocator-independent figure is the size of the tensors
autograd saves for backward (``saved_tensors_hooks``, distinct storages, weights and inputs excluded), i.e.
the activation memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

UNET = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=32, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
VARIANTS = ("ours", "diffusers", "ours+ckpt")


def build(args):
    """UNet, our ControlNet, diffusers' ControlNetModel (same weights), a fixed batch."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlnet import ControlledUNet, ControlNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.latent, **UNET)
    ours = ControlNet.from_unet(unet)
    ref = ControlNetModel.from_unet(unet)
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():  # non-zero zero convs so every path does real work (same values in both)
        for a, b in zip(ours.controlnet_down_blocks, ref.controlnet_down_blocks):
            a.weight.normal_(0, 0.01)
            b.weight.copy_(a.weight)
    controlled = ControlledUNet(unet, ours)  # freezes the UNet (requires_grad False, eval)
    b, s = args.batch, args.latent
    g = torch.Generator().manual_seed(1)
    batch = dict(sample=torch.randn(b, 4, s, s, generator=g), timestep=torch.randint(0, 1000, (b,), generator=g),
                 encoder_hidden_states=torch.randn(b, 16, 64, generator=g),
                 controlnet_cond=torch.rand(b, 3, 8 * s, 8 * s, generator=g), target=torch.randn(b, 4, s, s, generator=g))
    return unet, ours, ref, controlled, batch


def make_step(variant, unet, ours, ref, controlled, batch):
    net = ref if variant == "diffusers" else ours
    net.train()
    if variant == "ours+ckpt":
        ours.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x, t, text, cond, target = (batch[k] for k in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                                   "target"))

    def step():
        if variant == "diffusers":  # as in diffusers' examples/controlnet/train_controlnet.py
            down, mid = ref(x, t, text, controlnet_cond=cond, return_dict=False)
            pred = unet(x, t, text, down_block_additional_residuals=[d for d in down],
                        mid_block_additional_residual=mid, return_dict=False)[0]
        else:
            pred = controlled(x, t, text, controlnet_cond=cond)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024  # MiB
    return out


def _malloc_trim():
    """Hand freed heap pages back to the OS so that RSS tracks live memory (glibc only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(args):
    """Run in a fresh process: peak extra RSS of a step and bytes saved for backward."""
    unet, ours, ref, controlled, batch = build(args)
    step = make_step(args.worker, unet, ours, ref, controlled, batch)
    step()
    gc.collect()
    saved = {}
    persistent = {t.untyped_storage().data_ptr() for t in [*unet.parameters(), *ours.parameters(),
                                                            *ref.parameters(), *batch.values()]}

    def pack(tensor):  # activations only: weights and the input batch live anyway
        st = tensor.untyped_storage()
        if st.data_ptr() not in persistent:
            saved[st.data_ptr()] = st.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    gc.collect()
    _malloc_trim()
    base = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    print(json.dumps({"peak_mib": _status()["VmHWM"] - base, "saved_mib": sum(saved.values()) / 2 ** 20}))


def time_ms(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """{name: (median wall ms, median process-CPU ms, per-round CPU ms list)} per call.

    The call order alternates every round, so per-round ratios between variants are paired measurements."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            if r >= warmup:
                wall[k].append((time.perf_counter() - w0) * 1e3)
                cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k]), cpu[k]) for k in fns}


def paired_ratio(timings: dict, a: str, b: str) -> tuple:
    """Median and (min, max) of the per-round CPU-time ratios a/b (both measured in the same round)."""
    r = [x / y for x, y in zip(timings[a][2], timings[b][2])]
    return statistics.median(r), min(r), max(r)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared 2-core box)")
    p.add_argument("--infer-rounds", type=int, default=24,
                   help="timed inference rounds (bare UNet / ours / diffusers, interleaved); inference ratios "
                        "differ by a few %% between runs, so they need more samples than the training step")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return memory_worker(args)

    t_start = time.time()
    unet, ours, ref, controlled, batch = build(args)
    x, t, text, cond = (batch[k] for k in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond"))
    with torch.no_grad():  # same numbers from both implementations
        a = controlled(x, t, text, controlnet_cond=cond)
        d, m = ref(x, t, text, controlnet_cond=cond, return_dict=False)
        b = unet(x, t, text, down_block_additional_residuals=d, mid_block_additional_residual=m).sample
    parity = float((a - b).abs().max())

    def infer(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    inf = time_ms({
        "bare": infer(lambda: unet(x, t, text)),
        "ours": infer(lambda: controlled(x, t, text, controlnet_cond=cond)),
        "diffusers": infer(lambda: unet(x, t, text, **dict(zip(
            ("down_block_additional_residuals", "mid_block_additional_residual"),
            ref(x, t, text, controlnet_cond=cond, return_dict=False))))),
    }, rounds=args.infer_rounds)
    train = time_ms({v: make_step(v, unet, ours, ref, controlled, batch) for v in ("ours", "diffusers")},
                      rounds=args.steps)

    mem = {}
    for v in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", v, "--threads", str(args.threads),
               "--latent", str(args.latent), "--batch", str(args.batch)]
        # Fixed mmap threshold: large tensors are mmap'ed and unmapped on free, so RSS follows live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        mem[v] = json.loads(out.strip().splitlines()[-1])

    n_cn = sum(p.numel() for p in ours.parameters()) / 1e6
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"ControlNet training step, UNet {n_unet:.1f}M params frozen, ControlNet {n_cn:.1f}M trained, "
          f"latent {args.latent}x{args.latent}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.steps} timed training / {args.infer_rounds} inference rounds; "
          f"max |ours - diffusers| output = {parity:.1e}")
    print(f"{'':<24}{'ours':>10}{'diffusers':>11}{'ours/diff':>11}{'ours+ckpt':>11}")
    rows = [("train step wall (ms)", train["ours"][0], train["diffusers"][0], None),
            ("train step CPU (ms)", train["ours"][1], train["diffusers"][1], None),
            ("peak extra RSS (MiB)", mem["ours"]["peak_mib"], mem["diffusers"]["peak_mib"],
             mem["ours+ckpt"]["peak_mib"]),
            ("saved for bwd (MiB)", mem["ours"]["saved_mib"], mem["diffusers"]["saved_mib"],
             mem["ours+ckpt"]["saved_mib"]),
            ("inference wall (ms)", inf["ours"][0], inf["diffusers"][0], None),
            ("inference CPU (ms)", inf["ours"][1], inf["diffusers"][1], None)]
    for name, o, r, ck in rows:
        print(f"{name:<24}{o:>10.1f}{r:>11.1f}{o / r:>11.3f}{'' if ck is None else f'{ck:.1f}':>11}")
    for k, stat in ((0, "wall"), (1, "CPU")):
        bare = inf["bare"][k]
        oo, od = inf["ours"][k] / bare - 1, inf["diffusers"][k] / bare - 1
        print(f"{'overhead vs UNet (' + stat + ')':<24}{oo:>10.0%}{od:>11.0%}{(1 + oo) / (1 + od):>11.3f}"
              f"   (bare UNet {bare:.1f} ms)")
    med, lo, hi = paired_ratio(inf, "ours", "diffusers")
    print(f"{'inference CPU paired':<24}{'':>10}{'':>11}{med:>11.3f}   (median of per-round ours/diffusers; "
          f"range {lo:.3f}-{hi:.3f})")
    print(f"total benchmark time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()

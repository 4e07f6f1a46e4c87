"""Benchmark: the sampling command on the shipped default (4 images, 64x64, 20 steps), ours vs diffusers.

    python benchmarks/sample_speed.py [--repeats 3] [--threads 1] [--steps 20] [--num_images 4]

Two tables from the same run. End to end: wall time of the whole command (`python scripts/sample.py ...`:
interpreter start, imports, loading, canny/condition, sampling, writing PNGs) against the same job done by a
script on diffusers' StableDiffusionControlNetPipeline (same weights; DPMSolverMultistepScheduler, the
counterpart of our dpmpp_2m), plus the bare `import torch, diffusers, transformers` start-up both pay. In
process: the sampling call alone with the models loaded, ours vs diffusers, alternating order every round.
Wall time is inflated when other processes compete for the cores; process CPU time (children's CPU time for
the commands) is not. Target: the command under 30 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = "yellow circle with purple background"

DIFFUSERS_JOB = r"""
import sys, numpy as np, torch
from PIL import Image
from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
base, cn, cond, prompt, n, steps, size, out, threads = sys.argv[1:10]
torch.set_num_threads(int(threads))
pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=ControlNetModel.from_pretrained(cn),
                                                         safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
gens = [torch.Generator().manual_seed(i) for i in range(int(n))]
imgs = pipe(prompt, image=Image.open(cond).convert("RGB"), num_inference_steps=int(steps), guidance_scale=3.0,
            num_images_per_prompt=int(n), height=int(size), width=int(size), generator=gens).images
for i, im in enumerate(imgs):
    im.save(f"{out}/diffusers_{i}.png")
"""


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, children CPU s) of one subprocess run; raises with its output if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_pairs(pairs):
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models/default/base"))
    p.add_argument("--controlnet", default=str(ROOT / "models/default/controlnet"))
    p.add_argument("--repeats", type=int, default=3, help="runs per command / sampling call (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared 2-core box)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from make_fill_dataset import fill_sample

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="sample_speed_"))
    _, source, _ = fill_sample(np.random.default_rng(3), a.size)
    cond = tmp / "condition.png"
    Image.fromarray(source).save(cond)
    py = sys.executable
    cmds = {
        "cn-sample (scripts/sample.py)": [py, "scripts/sample.py", "--condition", str(cond), "--prompt", PROMPT,
                                          "--model", a.model, "--controlnet", a.controlnet, "--num_images",
                                          str(a.num_images), "--steps", str(a.steps), "--height", str(a.size),
                                          "--width", str(a.size), "--threads", str(a.threads), "--no_progress",
                                          "--out", str(tmp / "ours")],
        "diffusers StableDiffusionControlNetPipeline": [py, "-c", DIFFUSERS_JOB, a.model, a.controlnet, str(cond),
                                                        PROMPT, str(a.num_images), str(a.steps), str(a.size),
                                                        str(tmp), str(a.threads)],
        "start-up only (import torch, diffusers, transformers)": [py, "-c", "import torch, diffusers, transformers; "
                                                                  "import diffusers.models, transformers.models.clip"],
    }
    runs = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(a.repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            runs[k].append(run_timed(cmds[k]))
    e2e = {k: median_pairs(v) for k, v in runs.items()}

    # in process: sampling call only
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from controlnet.cli import generate, load_pipeline

    ours = load_pipeline(a.model, a.controlnet)
    ref = StableDiffusionControlNetPipeline.from_pretrained(a.model, controlnet=ControlNetModel.from_pretrained(
        a.controlnet), safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    cond_pil = Image.fromarray(source)
    fns = {
        "ours (controlnet.pipeline, dpmpp_2m)": lambda: generate(ours, PROMPT, source, a.num_images, 0, "dpmpp_2m",
                                                                 a.steps, 3.0),
        "diffusers (DPMSolverMultistepScheduler)": lambda: ref(
            PROMPT, image=cond_pil, num_inference_steps=a.steps, guidance_scale=3.0, num_images_per_prompt=a.num_images,
            height=a.size, width=a.size, generator=[torch.Generator().manual_seed(i) for i in range(a.num_images)]),
    }
    inproc = {k: [] for k in fns}
    keys = list(fns)
    for r in range(a.repeats + 1):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            if r:  # first round warms up
                inproc[k].append((time.perf_counter() - w0, time.process_time() - c0))
    inp = {k: median_pairs(v) for k, v in inproc.items()}

    print(f"{a.num_images} images {a.size}x{a.size}, {a.steps} steps, CFG 3.0, {a.threads} thread(s), "
          f"median of {a.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    ref_key = names[1]
    print(f"\nend to end (one command)                               wall s   CPU s   wall vs diffusers")
    for k, (w, c) in e2e.items():
        print(f"{k:<54}{w:>7.1f}{c:>8.1f}{w / e2e[ref_key][0]:>12.2f}x")
    w = e2e[names[0]][0]
    print(f"target: cn-sample < 30 s -> {'met' if w < 30 else 'NOT met'} ({w:.1f} s wall, "
          f"{e2e[names[0]][1]:.1f} s CPU)")
    ref_key = keys[1]
    print(f"\nsampling call only (models loaded)                     wall s   CPU s   wall vs diffusers")
    for k, (w, c) in inp.items():
        print(f"{k:<54}{w:>7.2f}{c:>8.2f}{w / inp[ref_key][0]:>12.2f}x")


if __name__ == "__main__":
    main()

"""Trainers on CUDA (make gpu-check; skipped without CUDA), through their command lines with the shared flag names:
20 steps in bf16 with gradient checkpointing, torch.compile off and on (accelerate launch --dynamo_backend), and FSDP
with one process. Each run must finish with 20 finite losses; the DiT's decrease, the ControlNet's zero convolutions
leave zero. (The plain mode of both, run on the CPU with these flags, passes: 2026-12-01.)"""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.controlnet.sd_fixtures import REPO, fill_data, tiny_sd

pytestmark = pytest.mark.gpu

COMMON = ["--max_train_steps", "20", "--gradient_checkpointing", "--report_to", "none",
          "--logging_steps", "1", "--checkpointing_steps", "1000", "--learning_rate", "1e-4", "--lr_warmup_steps", "0"]
# fsdp: the shipped FSDP2 files (full shard, their wrap classes; docs/distributed.md) with one process
FSDP_FILE = {"train_controlnet.py": "fsdp.yaml", "train_rf_dit.py": "fsdp_dit.yaml"}
LAUNCH = {"plain": [], "compile": ["--dynamo_backend", "inductor"], "fsdp": ["--config_file"]}


def launch(script: str, args: list, mode: str, out, precision: str = "bf16") -> list[float]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", precision, *(LAUNCH[mode] or ["--dynamo_backend", "no"]),
           *([str(REPO / "configs" / "accelerate" / FSDP_FILE[script])] if mode == "fsdp" else []),
           str(REPO / "scripts" / script), "--output_dir", str(out), *COMMON, "--mixed_precision", precision, *args]
    # the repo first, then what the caller had (scripts/gpu_check.sh: carried wheels in /tmp/site)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("mode", list(LAUNCH))
def test_controlnet_training_bf16_checkpointing(mode, tmp_path):
    losses = launch("train_controlnet.py", ["--pretrained_model_name_or_path", str(tiny_sd()), "--train_data_dir",
                                            str(fill_data()), "--resolution", "32", "--train_batch_size", "8"],
                    mode, tmp_path / "run")
    from controlnet import ControlNet
    assert ControlNet.from_pretrained(tmp_path / "run").controlnet_mid_block.weight.abs().max() > 0  # it learned
    assert len(losses) == 20


@pytest.mark.parametrize("mode", list(LAUNCH))
def test_dit_training_bf16_checkpointing(mode, tmp_path):
    losses = launch("train_rf_dit.py", ["--dataset", "digits", "--train_batch_size", "32"], mode, tmp_path / "run")
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("script", ["train_rf_dit.py", "train_controlnet.py"])
def test_fp16_training_with_loss_scaling(script, tmp_path):
    """--mixed_precision fp16 (accelerate's GradScaler; the CPU refuses it at start): 20 finite losses; a step whose
    scaled gradients overflow is skipped by the scaler (scaler_skipped in metrics.jsonl), not stopped as a NaN."""
    args = {"train_rf_dit.py": ["--dataset", "digits", "--train_batch_size", "32"],
            "train_controlnet.py": ["--pretrained_model_name_or_path", str(tiny_sd()), "--train_data_dir",
                                    str(fill_data()), "--resolution", "32", "--train_batch_size", "8"]}[script]
    losses = launch(script, args, "plain", tmp_path / "run", precision="fp16")
    if script == "train_rf_dit.py":
        assert sum(losses[-5:]) < sum(losses[:5])

"""Distributed engines through accelerate (docs/distributed.md): every configs/accelerate/*.yaml loads with
accelerate's own config loader and its engine keys are accelerate launch options; the ControlNet and DiT trainers
run under FSDP2 (full shard, the config files' wrap classes) in 2 processes over gloo on the CPU, with EMA, gradient
checkpointing, checkpoints and resume, and end on the weights of the same run under DDP.

One `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` runs all the jobs
(tests/diffusion/fsdp_cpu_worker.py; it explains how FSDP is switched on for a CPU). The reference is the DDP run
with the same processes, global batch, data order and noise, and a 1-process run accumulating 2 micro-batches per
step (data slices and noise are keyed by the global micro-batch index, diffusion.training.loop)
DeepSpeed needs CUDA (and the optional deepspeed package): its files are checked here, the runs are GPU-only.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.controlnet.sd_fixtures import REPO, fill_data, tiny_sd

CONFIGS = REPO / "configs" / "accelerate"
FILES = sorted(CONFIGS.glob("*.yaml"))
STEPS = 3  # ControlNet: checkpoints at 2 and 3; the resumed run continues from 2
# DDP and FSDP reduce gradients in different orders: float32 rounding, amplified a little by Adam (lr 1e-3, 3 steps)
ATOL = 2e-6


def _wrap(name: str) -> str:
    return yaml.safe_load((CONFIGS / name).read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]


def test_every_engine_has_a_config_file():
    kinds = {yaml.safe_load(f.read_text())["distributed_type"] for f in FILES}
    assert {f.name for f in FILES} >= {"single_gpu.yaml", "ddp_8gpu.yaml", "ddp_2x8gpu.yaml", "fsdp.yaml",
                                       "fsdp_dit.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    assert kinds == {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_config_file_loads_with_accelerate(path):
    """accelerate's loader (unknown top-level keys and bad enum values raise), then every fsdp_config /
    deepspeed_config key must be an `accelerate launch` option (the launcher copies them unchecked)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    cfg = ClusterConfig.from_yaml_file(str(path))
    options = {a.dest for a in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        bad = set(getattr(cfg, section) or {}) - options
        assert not bad, f"{path.name}: {section} keys unknown to accelerate launch: {sorted(bad)}"
    assert cfg.mixed_precision in ("no", "fp16", "bf16")
    assert cfg.num_processes == 8 * cfg.num_machines if cfg.distributed_type.value != "NO" else cfg.num_processes == 1
    if cfg.distributed_type.value == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and cfg.mixed_precision == "bf16"
        env = {"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": fsdp["fsdp_auto_wrap_policy"],
               "FSDP_TRANSFORMER_CLS_TO_WRAP": fsdp["fsdp_transformer_layer_cls_to_wrap"],
               "FSDP_STATE_DICT_TYPE": fsdp["fsdp_state_dict_type"], "FSDP_RESHARD_AFTER_FORWARD": "true"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            plugin = FullyShardedDataParallelPlugin()  # accelerate's own validation of the values
        assert plugin.transformer_cls_names_to_wrap == fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    if cfg.distributed_type.value == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] in (2, 3) and ds["gradient_accumulation_steps"] == 1
        assert ds["zero_stage"] == 2 or ds["zero3_save_16bit_model"] is True  # lets get_state_dict gather weights


def test_fsdp_wrap_classes_are_in_the_trained_models():
    """accelerate refuses a wrap class the model lacks: the UNet file's classes are in our ControlNet (and the UNet),
    the DiT file's in the DiT."""
    from controlnet import ControlNet
    from diffusion.models.dit import build_dit
    from tests.controlnet.tiny import make_unet

    def names(model):
        return {type(m).__name__ for m in model.modules()}

    unet_cls, dit_cls = _wrap("fsdp.yaml"), _wrap("fsdp_dit.yaml")
    unet = make_unet("sd15")
    assert set(unet_cls.split(",")) <= names(unet) & names(ControlNet.from_unet(unet))
    assert set(dit_cls.split(",")) <= names(build_dit("DiT-Tiny/4", input_size=8, in_channels=1, num_classes=10))


# ----------------------------------------------------------------------------------------------- 2-process FSDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_args() -> tuple[list, list]:
    """The ControlNet and DiT jobs' flags (per-process batch; the processes' count is the launch's)."""
    common = ["--report_to", "none", "--logging_steps", "1", "--gradient_checkpointing", "--use_ema", "--ema_decay",
              "0.5", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--progress_bar", "false",
              "--max_train_steps", str(STEPS)]
    cn = ["--pretrained_model_name_or_path", str(tiny_sd()), "--train_data_dir", str(fill_data()), "--resolution",
          "32", "--train_batch_size", "2", "--checkpointing_steps", "2", "--checkpoints_total_limit", "5", *common]
    dit = ["--model", "DiT-Tiny/4", "--dataset", "digits", "--train_batch_size", "8", "--validation_steps", "0",
           "--checkpointing_steps", "1000", "--samples_per_class", "1", "--validation_inference_steps", "2", *common]
    return cn, dit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cn, dit = _job_args()
    cn_wrap, dit_wrap = _wrap("fsdp.yaml"), _wrap("fsdp_dit.yaml")
    jobs = [dict(engine="fsdp", script="train_controlnet.py", wrap=cn_wrap,
                 args=cn + ["--output_dir", f"{out}/cn_fsdp"]),
            dict(engine="ddp", script="train_controlnet.py", args=cn + ["--output_dir", f"{out}/cn_ddp"]),
            dict(copy=[f"{out}/cn_fsdp", f"{out}/cn_resume",  # as if the FSDP run had stopped after step 2
                       ["checkpoint-00000003", "diffusion_pytorch_model.safetensors", "controlnet_ema"]]),
            dict(engine="fsdp", script="train_controlnet.py", wrap=cn_wrap,
                 args=cn + ["--output_dir", f"{out}/cn_resume", "--resume_from_checkpoint", "latest"]),
            dict(engine="fsdp", script="train_rf_dit.py", wrap=dit_wrap,
                 args=dit + ["--output_dir", f"{out}/dit_fsdp"]),
            dict(engine="ddp", script="train_rf_dit.py", args=dit + ["--output_dir", f"{out}/dit_ddp"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           str(REPO / "tests" / "diffusion" / "fsdp_cpu_worker.py"), json.dumps(jobs)]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return out, log


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def test_controlnet_fsdp_equals_ddp(runs):
    out, log = runs
    assert log.count("done: step 3, ControlNet saved to") == 3  # main process only
    fsdp, ddp = out / "cn_fsdp", out / "cn_ddp"
    ck = fsdp / "checkpoint-00000002"
    assert (ck / "pytorch_model_fsdp.bin").is_file() and (ck / "optimizer.bin").is_file()  # accelerate's FSDP state
    assert (ck / "random_states_1.pkl").is_file() and (ck / "ema_state.safetensors").is_file()
    for rel in ("diffusion_pytorch_model.safetensors", "controlnet_ema/diffusion_pytorch_model.safetensors",
                "checkpoint-00000002/controlnet/diffusion_pytorch_model.safetensors"):
        _assert_close(fsdp / rel, ddp / rel, ATOL)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (fsdp, ddp)]
    assert len(losses[0]) == STEPS and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert _weights(fsdp / "diffusion_pytorch_model.safetensors")["controlnet_mid_block.weight"].abs().max() > 0


def test_controlnet_fsdp_resume_is_exact(runs):
    out, log = runs
    assert "resumed from" in log and "checkpoint-00000002 at step 2" in log
    for rel in ("diffusion_pytorch_model.safetensors", "controlnet_ema/diffusion_pytorch_model.safetensors"):
        _assert_close(out / "cn_resume" / rel, out / "cn_fsdp" / rel, 0.0)


def test_dit_fsdp_equals_ddp(runs):
    out, _ = runs
    for net in ("transformer", "transformer_ema"):
        rel = f"{net}/diffusion_pytorch_model.safetensors"
        _assert_close(out / "dit_fsdp" / rel, out / "dit_ddp" / rel, ATOL)
    assert (out / "dit_fsdp" / "checkpoint-00000003" / "pytorch_model_fsdp.bin").is_file()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_processes_equal_one_process_accumulating_two_micro_batches(runs, tmp_path):
    """The 2-process runs (DDP and FSDP) end on the weights of a 1-process run of the same global batch as 2
    accumulated micro-batches: data slices and noise are keyed by the global micro-batch index."""
    import train_controlnet
    import train_rf_dit

    out, _ = runs
    cn, dit = _job_args()
    train_controlnet.main([*cn, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "cn")])
    train_rf_dit.main([*dit, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "dit")])
    for rel in ("diffusion_pytorch_model.safetensors", "controlnet_ema/diffusion_pytorch_model.safetensors"):
        _assert_close(tmp_path / "cn" / rel, out / "cn_ddp" / rel, ATOL)
        _assert_close(tmp_path / "cn" / rel, out / "cn_fsdp" / rel, ATOL)
    for net in ("transformer", "transformer_ema"):
        rel = f"{net}/diffusion_pytorch_model.safetensors"
        _assert_close(tmp_path / "dit" / rel, out / "dit_ddp" / rel, ATOL)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "cn", out / "cn_ddp")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_deepspeed_start_checks():
    """What the loop refuses under DeepSpeed (it steps inside backward, on its own accumulation count) is refused
    before anything is built; the DeepSpeed runs themselves need CUDA."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusion.training.args import TrainingArgs
    from diffusion.training.loop import check_engine

    plugin = SimpleNamespace(zero_stage=2, deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 1"):
        check_engine(acc, TrainingArgs(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="--on_nonfinite stop"):
        check_engine(acc, TrainingArgs(on_nonfinite="skip"))
    assert check_engine(acc, TrainingArgs(train_batch_size=3)) is True
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3


def test_sharded_fsdp_checkpoint_resumes_only_with_allow_pickle(tmp_path):
    """fsdp_state_dict_type SHARDED_STATE_DICT: accelerate writes torch.distributed.checkpoint directories (.distcp
    torch zips, a pickled .metadata that DCP unpickles in full). The vetting refuses them by default, naming the two
    ways out, and lets them through with --allow_pickle (it used to refuse them even then: no way to resume)."""
    import torch.distributed.checkpoint as dcp

    from diffusion.training.checkpoint import MANIFEST, TRAINER_STATE, PickleRefusedError, check_checkpoint

    ck = tmp_path / "checkpoint-00000002"
    dcp.save({"w": torch.randn(3, 3), "step": torch.tensor(2.0)}, checkpoint_id=str(ck / "pytorch_model_fsdp_0"))
    (ck / TRAINER_STATE).write_text('{"step": 2}')
    files = {str(p.relative_to(ck)): p.stat().st_size for p in ck.rglob("*") if p.is_file()}
    (ck / MANIFEST).write_text(json.dumps({"files": files}))
    with pytest.raises(PickleRefusedError, match="--allow_pickle.*FULL_STATE_DICT"):
        check_checkpoint(ck)
    check_checkpoint(ck, allow_pickle=True)

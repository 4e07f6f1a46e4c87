"""scripts/train_controlnet.py: real short runs on the tiny SD (learning, exact resume, 2-process launch, CLI)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlledUNet, ControlNet
from controlnet.data import collate
from controlnet.pipeline import load_components
from controlnet.training import TrainControlNetConfig, build_dataset, denoising_loss, train
from diffusion.training.loop import make_optimizer
from diffusion.training.checkpoint import load_state, step_generator

from .sd_fixtures import REPO, fill_data, tiny_sd

import train_controlnet as script  # noqa: E402  (scripts/ is on sys.path via sd_fixtures)

PROMPT = "red circle with blue background"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def make_cfg(out, **kw) -> TrainControlNetConfig:
    base = dict(pretrained_model_name_or_path=str(tiny_sd()), train_data_dir=str(fill_data()), output_dir=str(out),
                resolution=32, train_batch_size=8, learning_rate=1e-3, lr_warmup_steps=0, report_to="none",
                logging_steps=1000, checkpointing_steps=1000)
    return TrainControlNetConfig(**{**base, **kw})


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# ----------------------------------------------------------------------------------------------- learning
def test_training_learns_and_writes_outputs(tmp_path):
    cfg = make_cfg(tmp_path / "run", max_train_steps=30, report_to="tensorboard", validation_prompt=[PROMPT],
                   num_validation_images=2, validation_steps=30, validation_inference_steps=2, sampler="euler")
    res = train(cfg)
    assert res["step"] == 30 and len(res["losses"]) == 30
    pipe, cn = res["pipeline"], res["controlnet"].eval()

    # the frozen parts are untouched and carry no gradients
    fresh = load_components(cfg.pretrained_model_name_or_path)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        assert not any(p.requires_grad or p.grad is not None for p in module.parameters())
        assert_same_weights(state(module), state(fresh[name]))

    # no longer the identity (zero convolutions moved) and a lower denoising loss on a fixed eval batch
    assert cn.controlnet_mid_block.weight.abs().max() > 0
    ds = build_dataset(cfg)
    batch = collate([ds[i] for i in range(16)])

    def eval_loss(net):
        with torch.no_grad():
            return np.mean([denoising_loss(pipe, net, batch, step_generator(123, k)).item() for k in range(3)])

    fresh_cn = ControlNet.from_unet(pipe.unet).eval()
    before, after = eval_loss(ControlledUNet(pipe.unet, fresh_cn)), eval_loss(ControlledUNet(pipe.unet, cn))
    assert after < 0.95 * before, (before, after)

    # outputs: final diffusers-format ControlNet (= the checkpoint's), metrics, validation grid, TensorBoard image
    out = tmp_path / "run"
    assert_same_weights(state(ControlNet.from_pretrained(out)), state(cn))
    assert_same_weights(state(ControlNet.from_pretrained(out / "checkpoint-00000030" / "controlnet")), state(cn))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 30
    grid = np.asarray(Image.open(out / "validation" / "step-30.png"))
    assert grid.shape == (32, 3 * 32 + 2 * 2, 3)  # condition | 2 samples
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p.parent for p in (out / "logs").rglob("events.out.tfevents.*")]
    tags = set()
    for d in events:
        acc = EventAccumulator(str(d), size_guidance={"images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"]) | set(acc.Tags()["scalars"])
    assert {"validation", "train/loss"} <= tags


def test_bf16_gradient_checkpointing_workers(tmp_path):
    """Mixed precision (bf16 works on CPU): frozen models in bf16, fp32 ControlNet and sampler state."""
    cfg = make_cfg(tmp_path / "bf16", max_train_steps=2, train_batch_size=2, mixed_precision="bf16",
                   gradient_checkpointing=True, dataloader_num_workers=1, set_grads_to_none=True,
                   validation_prompt=[PROMPT], validation_steps=2, validation_inference_steps=2,
                   num_validation_images=1)
    res = train(cfg)
    assert res["pipeline"].unet.dtype == torch.bfloat16 and res["controlnet"].dtype == torch.float32
    assert np.isfinite(res["losses"]).all() and res["controlnet"].controlnet_mid_block.weight.abs().max() > 0
    grid = np.asarray(Image.open(tmp_path / "bf16" / "validation" / "step-2.png"))
    assert grid.shape == (32, 2 * 32 + 2, 3) and grid.std() > 0


def test_validation_pairs(tmp_path):
    """--validation_image files (Canny applied when training conditions are Canny) broadcast against prompts; without
    images, the first dataset conditions are used."""
    from controlnet.data import ControlNetDataset, build_rows
    from controlnet.training import validation_pairs

    img = fill_data() / "target" / "1.png"
    cfg = make_cfg(tmp_path, validation_prompt=[PROMPT], validation_image=[str(img), str(img)])
    ds = build_dataset(cfg)
    pairs = validation_pairs(cfg, ds)
    assert [p for p, _ in pairs] == [PROMPT, PROMPT]
    np.testing.assert_array_equal(pairs[0][1], np.asarray(Image.open(img).convert("RGB")))  # used as given
    rows, root = build_rows(train_data_dir=cfg.train_data_dir)
    canny_ds = ControlNetDataset(rows, 32, root, conditioning="canny")
    from controlnet import canny
    np.testing.assert_array_equal(validation_pairs(cfg, canny_ds)[1][1], canny(img, size=(32, 32)))
    cfg = make_cfg(tmp_path, validation_prompt=["a", "b"])
    pairs = validation_pairs(cfg, ds)
    assert [p for p, _ in pairs] == ["a", "b"]
    np.testing.assert_array_equal(pairs[1][1], np.asarray(Image.open(fill_data() / "source" / "1.png").convert("RGB")))
    assert validation_pairs(make_cfg(tmp_path), ds) == []


def test_start_from_pretrained_controlnet(tmp_path):
    """--controlnet_model_name_or_path: training continues from those weights (lr 0 keeps them exactly)."""
    from .tiny import randomize

    start = randomize(ControlNet.from_unet(load_components(tiny_sd())["unet"]), seed=4)
    start.save_pretrained(tmp_path / "start")
    res = train(make_cfg(tmp_path / "run", controlnet_model_name_or_path=str(tmp_path / "start"), max_train_steps=1,
                         train_batch_size=2, learning_rate=0.0))
    assert_same_weights(state(res["controlnet"]), state(start))


# ----------------------------------------------------------------------------------------------- resume
def test_resume_is_exact_with_gradient_accumulation(tmp_path):
    """4 steps straight == 2 steps + resume + 2 steps, bitwise (fp32 CPU), with accumulation 2 and an epoch of 3
    micro-batches, so accumulation groups straddle epochs; caption dropout and a warmup schedule included."""
    data = tmp_path / "data"
    shutil.copytree(fill_data(), data)
    lines = (data / "prompt.json").read_text().splitlines()[:6]
    (data / "prompt.json").write_text("\n".join(lines) + "\n")
    kw = dict(train_data_dir=str(data), train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=4,
              lr_scheduler="linear", lr_warmup_steps=2, proportion_empty_prompts=0.5, checkpointing_steps=1,
              checkpoints_total_limit=3)
    a = train(make_cfg(tmp_path / "a", **kw))
    names = sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*"))
    assert names == ["checkpoint-00000002", "checkpoint-00000003", "checkpoint-00000004"]  # total limit 3

    b_dir = tmp_path / "b"
    b_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-00000002", b_dir / "checkpoint-00000002")
    (b_dir / "checkpoint-00000009").mkdir()  # incomplete: no trainer_state.json, must be ignored by 'latest'
    (b_dir / ".tmp-checkpoint-00000010").mkdir()  # left by a crash mid-save: removed at start
    b = train(make_cfg(b_dir, resume_from_checkpoint="latest", **kw))
    assert b["step"] == 4 and len(b["losses"]) == 2
    assert b["losses"] == a["losses"][2:]
    assert_same_weights(state(a["controlnet"]), state(b["controlnet"]))
    assert not (b_dir / ".tmp-checkpoint-00000010").exists()

    ckpt = b_dir / "checkpoint-00000004"
    opt = torch.load(ckpt / "optimizer.bin", weights_only=False)
    assert {float(s["step"]) for s in opt["state"].values()} == {4.0}  # 4 optimizer steps, not 8 micro-batches
    sched = load_state(ckpt / "lr_scheduler_state.safetensors")
    assert sched["last_epoch"] == 4
    assert json.loads((ckpt / "trainer_state.json").read_text())["micro_step"] == 8

    # the diffusers spelling checkpoint-<step> resolves too; a bad name lists the valid ones
    c = train(make_cfg(tmp_path / "a", resume_from_checkpoint="checkpoint-3", **kw))
    assert_same_weights(state(a["controlnet"]), state(c["controlnet"]))
    with pytest.raises(ValueError, match="checkpoint-00000004"):
        train(make_cfg(tmp_path / "a", resume_from_checkpoint="checkpoint-77", **kw))


# ----------------------------------------------------------------------------------------------- multi-process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(tmp_path, *args: str) -> str:
    """`accelerate launch --multi_gpu --num_processes 2 scripts/train_controlnet.py ARGS` on CPU (gloo, one thread
    each, offline, --report_to none): its log; fails the test on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "scripts" / "train_controlnet.py"),
           "--report_to", "none", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def test_two_process_launch(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU: gloo DDP, main-only logging, no deadlock."""
    out = tmp_path / "mp"
    log = launch_two_processes(
        tmp_path, "--pretrained_model_name_or_path", str(tiny_sd()), "--train_data_dir", str(fill_data()),
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2", "--validation_prompt", PROMPT,
        "--num_validation_images", "1", "--validation_inference_steps", "2", "--logging_steps", "1")
    assert log.count("done: step 2") == 1  # main process only
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    for step in (1, 2):
        ck = out / f"checkpoint-{step:08d}"
        assert (ck / "random_states_0.pkl").is_file() and (ck / "random_states_1.pkl").is_file()
        assert (ck / "controlnet" / "config.json").is_file()
    assert (out / "validation" / "step-2.png").is_file()
    assert ControlNet.from_pretrained(out).controlnet_mid_block.weight.abs().max() > 0


# ----------------------------------------------------------------------------------------------- CLI
def test_help_lists_diffusers_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("pretrained_model_name_or_path", "controlnet_model_name_or_path", "output_dir", "resolution",
                 "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler",
                 "lr_warmup_steps", "max_train_steps", "num_train_epochs", "checkpointing_steps",
                 "checkpoints_total_limit", "resume_from_checkpoint", "mixed_precision", "gradient_checkpointing",
                 "use_8bit_adam", "set_grads_to_none", "proportion_empty_prompts", "validation_prompt",
                 "validation_image", "num_validation_images", "validation_steps", "report_to", "tracker_project_name",
                 "seed", "dataloader_num_workers", "max_train_samples", "image_column", "conditioning_image_column",
                 "caption_column", "train_data_dir", "dataset_name", "sampler", "conditioning", "skip_bad_images"):
        assert f"--{name} " in text, name


def test_dry_run_resolves_config_and_list_flags(tmp_path, capsys):
    import yaml

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"pretrained_model_name_or_path: {tiny_sd()}\ntrain_data_dir: {fill_data()}\n"
                        "resolution: 64\nlearning_rate: 1.0e-5\n")
    with pytest.raises(SystemExit) as e:
        script.main(["--config", str(cfg_file), "--resolution=32", "--train_batch_size", "3",
                     "--validation_prompt", "red circle, small", "blue circle", "--validation_image", "a.png",
                     "--sampler", "heun", "--gradient_checkpointing", "--dry-run"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["resolution"] == 32 and cfg["train_batch_size"] == 3 and cfg["learning_rate"] == 1e-5
    assert cfg["validation_prompt"] == ["red circle, small", "blue circle"] and cfg["validation_image"] == ["a.png"]
    assert cfg["sampler"] == "heun" and cfg["gradient_checkpointing"] is True


@pytest.mark.parametrize("args, message", [
    (["--sampler", "nope"], "valid"),
    (["--resolution", "30"], "multiple of 8"),
    (["--lr_scheduler", "exp"], "cosine_with_restarts"),
    (["--validation_prompt", "a", "b", "--validation_image", "x", "y", "z"], "validation images"),
])
def test_bad_arguments_exit_with_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", *args, "--dry-run"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_8bit_adam_needs_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    cfg = make_cfg("unused", use_8bit_adam=True)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], 1e-4)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_regression_target_keeps_float32_with_bf16_frozen_parts(kind, monkeypatch):
    """With the frozen VAE in bf16 (--mixed_precision bf16) the latents and noise are bf16, but the regression target
    is formed in float32 from them (as the schedule coefficients are), not rounded back to bf16: equal to the float64
    target of the same latents and noise to float32 precision."""
    from controlnet.pipeline import ControlNetPipeline
    from diffusion import target
    import controlnet.training as CT

    comps = load_components(tiny_sd(), dtype=torch.bfloat16)
    pipe = ControlNetPipeline(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"],
                              {**comps["scheduler_config"], "prediction_type": kind}, None)
    seen = {}
    real_target, real_mse = CT.target, CT.F.mse_loss

    def spy_target(prediction, x0, eps, t, schedule):
        seen.update(x0=x0, eps=eps, t=t)
        return real_target(prediction, x0, eps, t, schedule)

    def spy_mse(a, b):
        seen["target"] = b
        return real_mse(a, b)

    monkeypatch.setattr(CT, "target", spy_target)
    monkeypatch.setattr(CT.F, "mse_loss", spy_mse)
    batch = collate([build_dataset(make_cfg("unused"))[k] for k in range(4)])
    denoising_loss(pipe, lambda x, n, **kw: torch.zeros_like(x, dtype=torch.float32), batch, step_generator(0, 0))
    assert pipe.vae.dtype == torch.bfloat16 and torch.equal(seen["x0"], seen["x0"].bfloat16().to(seen["x0"].dtype))
    exact = target(pipe.prediction, seen["x0"].double(), seen["eps"].double(), seen["t"].double(), pipe.schedule)
    err = (seen["target"].double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-6, err


@pytest.mark.parametrize("sub", ["", "transformer_ema"])
def test_dit_base_points_to_the_dit_controlnet_trainer(sub, tmp_path, capsys):
    """A DiT / MM-DiT (ours) given to train_controlnet.py: exit 2 naming scripts/train_dit_controlnet.py, before
    anything is written (not a missing unet/config.json)."""
    base = tmp_path / "run" / sub
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"_class_name": "MMDiT"}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        script.main(["--pretrained_model_name_or_path", str(tmp_path / "run"), "--train_data_dir", str(fill_data()),
                     "--output_dir", str(out), "--report_to", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train_dit_controlnet.py" in err and "MMDiT" in err, err
    assert not out.exists()


def test_fresh_controlnet_fits_a_vae_factor_other_than_8(tmp_path):
    """No --controlnet_model_name_or_path on a base whose VAE downsamples by 4 (the shipped default): the new
    ControlNet's condition encoder downsamples by 4 too (SD's (16, 32, 96, 256) is for 8), and a step trains."""
    base = REPO / "models" / "default" / "base"
    res = train(make_cfg(tmp_path / "run", pretrained_model_name_or_path=str(base), max_train_steps=1,
                         train_batch_size=2, validation_steps=0))
    assert res["step"] == 1
    assert tuple(ControlNet.from_pretrained(tmp_path / "run").config.conditioning_embedding_out_channels) == (16, 32, 64)


def test_unsupported_vae_factor_is_refused_before_loading(tmp_path, capsys):
    """A new ControlNet for a VAE factor with no condition-encoder widths (16): exit 2 naming the factor and
    --controlnet_model_name_or_path, before anything is loaded or written."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sd(), base)
    cfg = json.loads((base / "vae" / "config.json").read_text())
    cfg["block_out_channels"] = [8] * 5
    (base / "vae" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        script.main(["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(fill_data()),
                     "--output_dir", str(out), "--report_to", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "VAE downsampling factor of 16" in err and "--controlnet_model_name_or_path" in err, err
    assert not out.exists() or not any(out.iterdir())  # (the run lock's directory, nothing in it)

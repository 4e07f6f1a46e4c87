"""controlnet/dit_training.py + scripts/train_dit_controlnet.py: a DiTControlNet trained on a frozen MM-DiT that
scripts/train_rf_dit.py trained briefly (fill data, 16 px, text captions), with the rectified-flow loss on the loop."""
import json
import shutil
from functools import partial

import pytest
import torch

from controlnet.data import collate
from controlnet.dit_controlnet import DiTControlNet
from controlnet.dit_training import DiTControlNetTask, TrainDiTControlNetConfig
from controlnet.training import build_dataset
from diffusion.models import load_pretrained
from diffusion.models.dit import build_dit
from diffusion.training.loop import make_accelerator, train as run_task
from diffusion.training.rf_dit import TrainConfig, train as train_base

from .sd_fixtures import fill_data
from .test_train_controlnet import assert_same_weights, state

import eval_dit_controlnet  # noqa: E402  (scripts/ is on sys.path via sd_fixtures)
import train_dit_controlnet as script  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 16 px MM-DiT (depth 2, hidden 64) after 100 rectified-flow steps on 64 fill images: it knows the colours
    of a caption, not where the circle is; the run dir holds transformer/, text_encoder/ and config.yaml."""
    from accelerate.state import AcceleratorState, GradientState

    out, threads = tmp_path_factory.mktemp("dit_cn") / "base", torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/conftest.py's _one_thread, which module fixtures precede
    train_base(TrainConfig(output_dir=str(out), dataset="folder", data_dir=str(fill_data(64, 16)), resolution=16,
                           backbone="mmdit", model="MMDiT-Tiny", hidden_size=64, num_heads=2, text_hidden_size=32,
                           train_batch_size=16, max_train_steps=100, learning_rate=2e-3, lr_warmup_steps=0,
                           use_ema=False, report_to="none", progress_bar=False, checkpointing_steps=1000,
                           validation_steps=0, samples_per_class=1, validation_inference_steps=1))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    return out


def make_cfg(base, out, **kw) -> TrainDiTControlNetConfig:
    args = dict(pretrained_model_name_or_path=str(base), train_data_dir=str(fill_data(64, 16)), output_dir=str(out),
                train_batch_size=16, learning_rate=3e-3, report_to="none", progress_bar=False,
                checkpointing_steps=1000, validation_steps=0)
    return TrainDiTControlNetConfig(**{**args, **kw})


def test_controlnet_learns_to_follow_the_condition(base_run, tmp_path):
    """60 steps: the training loss falls; on 16 held-out fill images the trained ControlNet (EMA) lowers the
    denoising loss at t = 0.5, 0.8 by >= 10% and the MSE of 8-step samples to the target images by >= 8% against the
    untrained one (= the bare MM-DiT; scripts/eval_dit_controlnet.py; measured: 0.363 -> 0.305 and 0.685 -> 0.596);
    exports load in one call."""
    cfg = make_cfg(base_run, tmp_path / "run", max_train_steps=60, use_ema=True, ema_decay=0.95,
                   proportion_empty_prompts=0.1, checkpointing_steps=30, checkpoints_total_limit=1,
                   validation_steps=60, validation_prompt=[PROMPT], num_validation_images=1,
                   validation_inference_steps=2)
    task = DiTControlNetTask(cfg)
    res = run_task(task)
    losses = res["losses"]
    assert res["step"] == 60 and sum(losses[-10:]) < 0.95 * sum(losses[:10])
    transformer = task.controlled.transformer
    assert_same_weights(state(transformer), state(load_pretrained(base_run / "transformer")))  # frozen, no gradients
    assert not any(p.requires_grad for p in transformer.parameters())

    held = fill_data(16, 16, seed=1)
    r = eval_dit_controlnet.evaluate(tmp_path / "run", held, num=16, steps=8, scales=(1.0,))  # the EMA from disk
    (loss0, mse0), (loss1, mse1) = [(r[k]["loss"], r[k]["mse"][1.0]) for k in ("untrained", "trained")]
    print(f"held-out denoising loss {loss0:.4f} -> {loss1:.4f}, sample MSE {mse0:.4f} -> {mse1:.4f}")
    assert loss1 < 0.9 * loss0 and mse1 < 0.92 * mse0
    # a sample depends on its seed and condition, not on the batch it is drawn in (conditions sliced per chunk)
    batch = collate([build_dataset(make_cfg(base_run, tmp_path / "x", train_data_dir=str(held)))[i] for i in range(8)])
    draw = partial(task.sample, res["ema"].eval(), batch["text"], batch["conditioning_pixel_values"], seed=5, steps=2)
    assert torch.allclose(draw(batch_size=3), draw(), atol=1e-5)

    out = tmp_path / "run"
    assert_same_weights(state(DiTControlNet.from_pretrained(out)), state(res["controlnet"]))
    assert_same_weights(state(DiTControlNet.from_pretrained(out / "controlnet_ema")), state(res["ema"]))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-00000060"]
    ema_checkpoint = DiTControlNet.from_pretrained(out / "checkpoint-00000060" / "controlnet_ema")
    assert_same_weights(state(ema_checkpoint), state(res["ema"]))
    assert (out / "validation" / "step-60.png").is_file()


def test_resume_is_exact(base_run, tmp_path):
    """4 steps straight == 2 + resume + 2, bitwise (losses, ControlNet, EMA), with accumulation 2 over epochs of 3
    micro-batches, caption dropout and a warm-up; --controlnet_model_name_or_path starts a new run from the export."""
    kw = dict(train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=4, max_train_samples=6,
              lr_scheduler="linear", lr_warmup_steps=2, proportion_empty_prompts=0.5, checkpointing_steps=2,
              use_ema=True, ema_decay=0.5)
    a = run_task(DiTControlNetTask(make_cfg(base_run, tmp_path / "a", **kw)))
    shutil.copytree(tmp_path / "a" / "checkpoint-00000002", tmp_path / "b" / "checkpoint-00000002")
    b = run_task(DiTControlNetTask(make_cfg(base_run, tmp_path / "b", resume_from_checkpoint="latest", **kw)))
    assert b["losses"] == a["losses"][2:]
    assert_same_weights(state(a["controlnet"]), state(b["controlnet"]))
    assert_same_weights(state(a["ema"]), state(b["ema"]))

    # --controlnet_model_name_or_path: a new run starts from the exported ControlNet
    task = DiTControlNetTask(make_cfg(base_run, tmp_path / "c", controlnet_model_name_or_path=str(tmp_path / "a")))
    task.accelerator = make_accelerator(task.cfg)
    assert_same_weights(state(task.build()[1]), state(a["controlnet"]))


def test_dit_base_takes_class_index_captions(tmp_path):
    """A class-conditional 1-channel DiT base: captions are class indices ('' = null class); text is refused."""
    torch.manual_seed(0)
    dit = build_dit("DiT-Tiny/4", input_size=16, in_channels=1, num_classes=10, class_dropout_prob=0.0)
    for p in dit.parameters():  # leave adaLN-Zero: a zero final layer would pass no gradient to the ControlNet
        torch.nn.init.normal_(p, std=0.05)
    dit.save_pretrained(tmp_path / "dit")
    data = tmp_path / "data"
    shutil.copytree(fill_data(64, 16), data)
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()[:8]]
    (data / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": str(i % 3) if i % 4 else ""}) + "\n"
                                                 for i, r in enumerate(rows)))
    (data / "prompt.json").unlink()
    cfg = make_cfg(tmp_path / "dit", tmp_path / "run", train_data_dir=str(data), train_batch_size=4,
                   max_train_steps=2, controlnet_num_layers=2, validation_steps=2, validation_prompt=["1"],
                   num_validation_images=2, validation_inference_steps=1)
    task = DiTControlNetTask(cfg)
    res = run_task(task)
    assert res["step"] == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    cn = DiTControlNet.from_pretrained(tmp_path / "run")
    assert cn.config.arch == "dit" and cn.num_layers == 2 and cn.config.class_dropout_prob == 0.0
    assert task.labels(["2", ""]).tolist() == [2, 10]
    with pytest.raises(ValueError, match="class indices 0...9"):
        task.labels(["red circle", "11"])


def test_cli_refuses_mismatched_base(base_run, tmp_path, capsys):
    """Bad input exits 2 naming the flag: another objective than the base's, a non-DiT dir, no text encoder, an
    SD3-only flag."""
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    no_te = tmp_path / "no_te"
    shutil.copytree(base_run / "transformer", no_te / "transformer")
    common = ["--train_data_dir", str(fill_data(64, 16)), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    for base, extra, message in [
            (base_run, ["--prediction", "eps"], "trained with --prediction velocity"),
            (other, [], "holds a UNet2DConditionModel, not a DiT / MMDiT"),
            (no_te, [], "--text_encoder"),
            (tmp_path, [], "holds no config.json, transformer_ema/ or transformer/"),
            (base_run, ["--upcast_vae"], "--upcast_vae: SDXL / SD3 pipelines only")]:
        with pytest.raises(SystemExit) as e:
            script.main(["--pretrained_model_name_or_path", str(base), *common, *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.yaml").exists()

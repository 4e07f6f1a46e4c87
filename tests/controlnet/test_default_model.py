"""The shipped default (models/default) and the scripts around it: quality on held-out conditions, the demo,
the notebook-style sampler comparison, and the resumable build recipe end to end on a tiny configuration."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from .sd_fixtures import REPO, fill_data

import build_default  # noqa: E402  (scripts/ is on sys.path via sd_fixtures)
import eval_default  # noqa: E402

DEFAULT = REPO / "models" / "default"


@pytest.fixture(scope="module")
def default_pipe():
    from controlnet.cli import load_pipeline

    return load_pipeline(DEFAULT / "base", DEFAULT / "controlnet")


def test_default_follows_edges_and_colours_on_held_out_conditions(tmp_path, capsys):
    """Issue targets (edge F1 >= 0.6, colours >= 80%) hold on a 32-condition subset at 10 steps, with margin
    for the smaller sample; the full figures come from `python scripts/eval_default.py` (256 conditions)."""
    summary = eval_default.main(["--n", "32", "--steps", "10", "--grid", str(tmp_path / "grid.png"),
                                 "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "edge F1" in out and ">= 0.60" in out and (tmp_path / "grid.png").is_file()
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert summary["edge_f1"] >= 0.55
    assert summary["both_colors_acc"] >= 0.8
    assert summary["edge_f1"] <= summary["edge_f1_target_ceiling"] + 0.05  # Canny of a sample vs of the truth


def test_edges_come_from_the_controlnet(default_pipe):
    """With the ControlNet residuals scaled to 0 the base ignores the outline: edge F1 collapses and the circle
    colour is mostly wrong (there is no circle where the score looks for it)."""
    off = eval_default.evaluate(default_pipe, n=16, steps=10, conditioning_scale=0.0)["summary"]
    on = eval_default.evaluate(default_pipe, n=16, steps=10, conditioning_scale=1.0)["summary"]
    assert off["edge_f1"] < 0.3 < 0.55 < on["edge_f1"]
    assert off["circle_color_acc"] < on["circle_color_acc"]


def _run_script(args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_demo_writes_the_figure(tmp_path):
    import demo_controlnet
    from PIL import Image

    out = tmp_path / "demo.png"
    assert demo_controlnet.main(["--out", str(out), "--steps", "2", "--num_images", "1"]) == out
    width, height = Image.open(out).size
    assert width > 300 and height > 200
    # both CLI runs wrote their grid and sample
    for job in ("astronaut", "held-out"):
        assert (tmp_path / "demo" / job / "grid.png").is_file()
        assert (tmp_path / "demo" / job / "sample_00.png").is_file()


def test_compare_samplers_example_runs_and_errors_fall(tmp_path):
    out = _run_script(["docs/examples/compare_samplers.py"],
                      {"COMPARE_SAMPLERS_QUICK": "1", "COMPARE_SAMPLERS_OUT": str(tmp_path / "cmp.png")})
    assert (tmp_path / "cmp.png").is_file()
    for name in ("ddim", "heun", "dpmpp_2m"):
        line = next(s for s in out.splitlines() if s.startswith(name + " "))
        errors = [float(e) for e in re.findall(r"NFE \d+: ([0-9.]+)", line)]
        assert len(errors) >= 2 and errors[-1] < errors[0], line


def test_build_default_recipe_end_to_end_on_a_tiny_configuration(tmp_path):
    """scripts/build_default.py runs every step (t2i -> init ControlNet -> ControlNet -> assemble) from configs,
    skips steps whose output exists, and the assembled directory is what the CLI loads."""
    data = fill_data(32, 16)
    t2i = dict(train_data_dir=str(data), output_dir=str(tmp_path / "t2i"), resolution=16,
               block_out_channels=[8, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
               attention_heads=2, norm_num_groups=4, text_hidden_size=16, text_layers=1, max_length=8,
               vae_block_out_channels=[8, 8], vae_steps=2, vae_batch_size=4, train_batch_size=4,
               max_train_steps=2, lr_warmup_steps=0, checkpointing_steps=2, validation_steps=0, validation_inference_steps=2,
               report_to="none", progress_bar=False)
    cn = dict(pretrained_model_name_or_path=str(tmp_path / "t2i" / "pipeline"),
              controlnet_model_name_or_path=str(tmp_path / "cn" / "init"), train_data_dir=str(data),
              output_dir=str(tmp_path / "cn"), resolution=16, conditioning="dataset", train_batch_size=4,
              max_train_steps=2, learning_rate=1e-4, lr_warmup_steps=0, checkpointing_steps=2,
              validation_steps=100, num_validation_images=1, validation_inference_steps=2, report_to="none")
    (tmp_path / "t2i.yaml").write_text(yaml.safe_dump(t2i))
    (tmp_path / "cn.yaml").write_text(yaml.safe_dump(cn))
    out = tmp_path / "default"
    args = ["scripts/build_default.py", "--t2i_config", str(tmp_path / "t2i.yaml"),
            "--controlnet_config", str(tmp_path / "cn.yaml"), "--out", str(out)]
    log = _run_script(args)
    assert "train_t2i.py" in log and "train_controlnet.py" in log and "in total" in log
    from controlnet.cli import load_pipeline, model_configs

    model_configs(out / "base", out / "controlnet")  # a matching pair
    pipe = load_pipeline(out / "base", out / "controlnet")
    assert tuple(pipe.controlnet.config.conditioning_embedding_out_channels) == (16, 32)  # factor 2 VAE -> 2 levels
    trained = pipe.controlnet.state_dict()
    from safetensors.torch import load_file

    start = load_file(tmp_path / "cn" / "init" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)  # the ControlNet trained
    # a second run finds every output and only re-assembles
    again = _run_script(args)
    assert "train_t2i.py" not in again and "train_controlnet.py" not in again and "in total" in again


def test_build_default_rejects_unknown_steps():
    with pytest.raises(SystemExit, match="unknown steps.*valid: data,t2i"):
        build_default.main(["--steps", "data,train"])
    from controlnet.config import hint_widths

    with pytest.raises(ValueError, match="VAE downsampling factor of 3"):
        hint_widths(3)

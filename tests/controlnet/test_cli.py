"""cn-sample (controlnet.cli) end to end on the shipped default model; bad inputs fail early and write nothing."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from controlnet import ControlNet, ControlNetConfig
from controlnet.cli import DEFAULT_CONTROLNET, DEFAULT_DIR, DEFAULT_MODEL, main, run

from .sd_fixtures import REPO

import make_fill_dataset  # noqa: E402  (scripts/ is on sys.path via sd_fixtures)

PROMPT = "yellow circle with purple background"
SIZE, PAD = 32, 2  # small and fast; the model's native size is 64
FAST = ["--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--no_progress", "--threads", "1"]


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    _, outline, _ = make_fill_dataset.fill_sample(np.random.default_rng(5), 64)
    Image.fromarray(outline).save(d / "cond.png")
    from skimage import data
    Image.fromarray(data.astronaut()).save(d / "photo.png")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    paths = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "3", "--seed", "11",
                 "--out", str(out), *FAST])
    return out, paths


def test_writes_grid_and_samples(first_run):
    out, paths = first_run
    assert [p.name for p in paths] == ["grid.png", "sample_00.png", "sample_01.png", "sample_02.png", "settings.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temporary files left
    grid = read(out / "grid.png")
    assert grid.shape == (SIZE, 5 * SIZE + 4 * PAD, 3)  # input | edges | 3 samples
    for i in range(3):
        tile = grid[:, (2 + i) * (SIZE + PAD):(2 + i) * (SIZE + PAD) + SIZE]
        np.testing.assert_array_equal(tile, read(out / f"sample_{i:02d}.png"))
    assert read(out / "sample_00.png").shape == (SIZE, SIZE, 3)


def test_same_seed_same_image_and_batch_independent(first_run, inputs, tmp_path):
    out, _ = first_run
    again = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "3", "--seed", "11",
                 "--out", str(tmp_path / "b"), *FAST])
    for i in range(3):
        np.testing.assert_array_equal(read(again[1 + i]), read(out / f"sample_{i:02d}.png"))
    # sample i depends on seed + i only: a batch of one with seed 12 reproduces the second image
    one = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "1", "--seed", "12",
               "--out", str(tmp_path / "c"), *FAST])
    diff = np.abs(read(one[1]).astype(int) - read(out / "sample_01.png").astype(int))
    assert diff.max() <= 1  # same noise; batched convolutions may round differently in the last bit
    other = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "1", "--seed", "99",
                 "--out", str(tmp_path / "d"), *FAST])
    assert np.abs(read(other[1]).astype(int) - read(out / "sample_00.png").astype(int)).mean() > 1


def test_time_grid_reaches_the_sampler(first_run, inputs, tmp_path):
    """--time_grid uniform gives the pipeline's uniform samples (and differs from the default grid here)."""
    from controlnet.cli import fit, generate, load_pipeline

    out, _ = first_run
    paths = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "1", "--seed", "11",
                 "--time_grid", "uniform", "--out", str(tmp_path / "g"), *FAST])
    cond = fit(read(inputs / "cond.png"), SIZE, SIZE)  # what the CLI does to a --condition image
    direct = generate(load_pipeline(), PROMPT, cond, 1, 11, steps=2, height=SIZE, width=SIZE, time_grid="uniform")
    assert np.abs(read(paths[1]).astype(int) - direct[0].astype(int)).max() <= 1
    assert np.abs(read(paths[1]).astype(int) - read(out / "sample_00.png").astype(int)).mean() > 1


def test_image_goes_through_canny(inputs, tmp_path, capsys):
    assert main(["--image", str(inputs / "photo.png"), "--prompt", "white circle with blue background",
                 "--num_images", "1", "--sampler", "heun", "--guess_mode", "--out", str(tmp_path / "o"), *FAST]) == 0
    assert "grid.png" in capsys.readouterr().out
    grid = read(tmp_path / "o" / "grid.png")
    edges = grid[:, SIZE + PAD:2 * SIZE + PAD]
    assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255  # a binary Canny map with edges


def _mismatched_controlnet(d, kind):
    if kind == "hint":  # 8x condition encoder (SD's) for a 4x VAE
        cfg = json.loads((DEFAULT_CONTROLNET / "config.json").read_text())
        cfg["conditioning_embedding_out_channels"] = [16, 32, 96, 256]
    else:  # another base's channels
        cfg = ControlNetConfig(in_channels=4, block_out_channels=(16, 32), down_block_types=(
            "DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32, norm_num_groups=8,
            layers_per_block=1, conditioning_embedding_out_channels=(16, 32, 64)).to_dict()
    ControlNet.from_config(ControlNetConfig.from_dict(cfg)).save_pretrained(d)
    return d


@pytest.mark.parametrize("case, msg", [
    ("missing image", "--image .*missing.png: file not found"),
    ("not an image", "cannot read it as an image"),
    ("unknown sampler", "unknown --sampler 'nope'; valid: .*dpmpp_2m"),
    ("zero steps", "--steps must be >= 1"),
    ("unknown time grid", "unknown --time_grid 'cosine'; valid: .*log_snr.*trailing"),
    ("height 30", "--height must be a positive multiple of 8, got 30; e.g. --height 32"),
    ("width 100", "--width must be a positive multiple of 8"),
    ("controlnet hint", "does not match --model .*condition downscale: ControlNet 8x vs base VAE 4x"),
    ("controlnet channels", "does not match --model .*block_out_channels"),
    ("not a model", "--model .* is not a directory"),
    ("checkpoint dir", r"--controlnet .*checkpoint-00000005 has no config.json, but its subfolder "
                       r".*checkpoint-00000005/controlnet holds a ControlNet.*pass --controlnet .*/controlnet"),
    ("out under a file", "--out .*notes.txt/o: .*notes.txt is a file"),
    ("out unwritable", "--out /sys/cn-sample-test: cannot write in /sys"),
    ("invert with --image", "--invert_condition applies to a --condition image only"),
    ("scales without guess mode", "--guess_mode_scales only applies with --guess_mode"),
])
def test_bad_input_clear_error_and_no_output(case, msg, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--out", str(out), *FAST]
    extra = {"missing image": ["--image", str(inputs / "missing.png")],
             "not an image": ["--image", str(inputs / "notes.txt")],
             "unknown sampler": ["--sampler", "nope"], "unknown time grid": ["--time_grid", "cosine"], "zero steps": ["--steps", "0"], "height 30": ["--height", "30"],
             "width 100": ["--width", "100"], "not a model": ["--model", str(tmp_path / "nowhere")],
             "out under a file": ["--out", str(inputs / "notes.txt" / "o")],
             "out unwritable": ["--out", "/sys/cn-sample-test"],
             "invert with --image": ["--image", str(inputs / "photo.png"), "--invert_condition"],
             "scales without guess mode": ["--guess_mode_scales", "original"]}
    if case == "checkpoint dir":  # a training checkpoint keeps its ControlNet in checkpoint-N/controlnet
        ckpt = tmp_path / "run" / "checkpoint-00000005"
        shutil.copytree(DEFAULT_CONTROLNET, ckpt / "controlnet")
        extra[case] = ["--controlnet", str(ckpt)]
    if case.startswith("controlnet"):
        extra[case] = ["--controlnet", str(_mismatched_controlnet(tmp_path / "cn", case.split()[1]))]
    if case in ("missing image", "not an image", "invert with --image"):
        args = args[2:]
    with pytest.raises(SystemExit) as e:
        main([*args, *extra[case]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cn-sample: error: ")
    import re
    assert re.search(msg, err), err
    assert not out.exists()


def test_failure_during_generation_leaves_nothing(inputs, tmp_path, monkeypatch):
    import controlnet.cli as cli

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(cli, "generate", boom)
    with pytest.raises(RuntimeError):
        run(["--condition", str(inputs / "cond.png"), "--out", str(tmp_path / "o"), *FAST])
    assert not (tmp_path / "o").exists()


def test_shipped_default_loads_with_expected_configs():
    files = [p for p in DEFAULT_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2 ** 20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert (DEFAULT_DIR / "README.md").is_file()

    from controlnet.cli import load_pipeline, model_configs
    cfgs = model_configs(DEFAULT_MODEL, DEFAULT_CONTROLNET)  # compatible pair
    assert cfgs["vae_factor"] == 4 and cfgs["unet"]["sample_size"] == 16 and cfgs["unet"]["in_channels"] == 4
    assert cfgs["controlnet"]["conditioning_embedding_out_channels"] == [16, 32, 64]
    pipe = load_pipeline()
    assert pipe.prediction == "v" and pipe.schedule.num_train_timesteps == 1000
    assert pipe.unet.dtype == pipe.controlnet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype
    assert str(pipe.unet.dtype) == "torch.float32"
    assert pipe.tokenizer.model_max_length == 16
    assert REPO in DEFAULT_DIR.parents


# ----------------------------------------------------------------------------------------------- condition checks
def test_condition_warnings_heuristics(inputs):
    from controlnet.cli import condition_warnings

    edges = read(inputs / "cond.png")
    assert condition_warnings(edges) == []  # white outline on black
    inverted = condition_warnings(255 - edges)
    assert len(inverted) == 1 and "looks inverted" in inverted[0] and "--invert_condition" in inverted[0]
    photo = condition_warnings(read(inputs / "photo.png"))
    assert len(photo) == 1 and "looks like a photo" in photo[0] and "--image" in photo[0]
    gray_photo = np.repeat(read(inputs / "photo.png")[..., :1], 3, axis=2)  # no colour, many grey levels
    assert "looks like a photo" in condition_warnings(gray_photo)[0]


def test_inverted_condition_warns_and_invert_condition_repairs_it(first_run, inputs, tmp_path, capsys):
    from controlnet.cli import build_parser, validate

    Image.fromarray(255 - read(inputs / "cond.png")).save(tmp_path / "inv.png")
    args = ["--condition", str(tmp_path / "inv.png"), "--prompt", PROMPT, "--num_images", "1", "--seed", "11",
            "--out", str(tmp_path / "o"), *FAST]
    validate(build_parser().parse_args(args))
    assert "cn-sample: warning: --condition looks inverted" in capsys.readouterr().err
    validate(build_parser().parse_args(["--condition", str(inputs / "photo.png"), *args[2:]]))
    assert "cn-sample: warning: --condition looks like a photo" in capsys.readouterr().err
    paths = run([*args, "--invert_condition"])
    assert "warning" not in capsys.readouterr().err
    out, _ = first_run  # same edges as the original map: same first sample (seed 11)
    np.testing.assert_array_equal(read(paths[0])[:, SIZE + PAD:2 * SIZE + PAD], read(out / "grid.png")[:, SIZE + PAD:
                                                                                                      2 * SIZE + PAD])
    assert np.abs(read(paths[1]).astype(int) - read(out / "sample_00.png").astype(int)).max() <= 1


# ----------------------------------------------------------------------------------------------- outputs
def test_stale_samples_of_an_earlier_run_are_removed(inputs, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for name in ("sample_00.png", "sample_01.png", "sample_02.png", "sample_03.png", "grid.png"):
        Image.new("RGB", (4, 4)).save(out / name)
    (out / "notes.txt").write_text("mine")
    Image.new("RGB", (4, 4)).save(out / "sample_final.png")  # not a name cn-sample writes
    run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "2", "--out", str(out), *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "notes.txt", "sample_00.png", "sample_01.png",
                                                     "sample_final.png", "settings.json"]
    assert read(out / "sample_00.png").shape == (SIZE, SIZE, 3)
    assert "removed 2 stale sample_*.png of an earlier run (sample_02.png..)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- guess mode
def test_guess_mode_options_reach_the_samples(inputs, tmp_path):
    from controlnet.cli import fit, generate, load_pipeline

    cond = fit(read(inputs / "cond.png"), SIZE, SIZE)
    pipe = load_pipeline()
    kw = dict(num_images=1, seed=3, steps=2, height=SIZE, width=SIZE, guess_mode=True)
    ref = generate(pipe, PROMPT, cond, **kw).astype(int)
    orig = generate(pipe, PROMPT, cond, **kw, guess_mode_scales="original").astype(int)
    mid = generate(pipe, PROMPT, cond, **kw, only_mid_control=True).astype(int)
    assert np.abs(orig - ref).max() >= 1 and np.abs(mid - ref).mean() > 1  # scales 0.6% apart; no skip residuals
    paths = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "1", "--seed", "3",
                 "--guess_mode", "--guess_mode_scales", "original", "--out", str(tmp_path / "o"), *FAST])
    np.testing.assert_array_equal(read(paths[1]), orig[0].astype(np.uint8))


def test_cli_scale_names_are_the_model_s():
    from controlnet.cli import GUESS_MODE_SCALES
    from controlnet.model import GUESS_MODE_SCALES as MODEL_SCALES

    assert GUESS_MODE_SCALES == MODEL_SCALES


# ----------------------------------------------------------------------------------------------- start-up
def test_help_does_not_import_torch():
    """`cn-sample --help` parses arguments without importing torch / diffusers / transformers (lazy imports)."""
    code = ("import sys\nfrom controlnet.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'diffusers', 'transformers'))\nprint('HEAVY', heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--guess_mode_scales" in res.stdout and "HEAVY []" in res.stdout, res.stdout[-500:]
    res = subprocess.run([sys.executable, "-X", "importtime", "scripts/sample.py", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0 and "usage: cn-sample" in res.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time")}
    assert "controlnet.cli" in imported and "torch" not in imported


@pytest.fixture
def sample_spy(monkeypatch):
    """Records the keywords the pipeline hands diffusion.sample (and still samples)."""
    import controlnet.pipeline as pipeline_module

    seen, real = [], pipeline_module.sample

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(pipeline_module, "sample", spy)
    return seen


@pytest.mark.parametrize("flags, expected", [
    (["--sampler", "euler_ancestral", "--eta", "0.5", "--s_noise", "0.9", "--noise", "brownian", "--time_grid",
      "karras", "--rho", "5", "--sigma_max", "50"],
     dict(sampler="euler_ancestral", time_grid="karras", grid_options={"rho": 5.0, "sigma_max": 50.0}, eta=0.5,
          s_noise=0.9, noise="brownian")),
    (["--sampler", "unipc", "--order", "1", "--sigmas", "14.6,2.9,0.3,0"],
     dict(sampler="unipc", time_grid=None, sigmas=[14.6, 2.9, 0.3, 0.0], order=1)),
    (["--time_grid", "log_snr", "--t_max", "0.9"], dict(time_grid="log_snr", grid_options={"t_max": 0.9})),
])
def test_grid_and_sampler_options_reach_the_sampler(flags, expected, sample_spy, inputs, tmp_path):
    args = ["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "1", "--out",
            str(tmp_path / "o"), *FAST]
    if "--sigmas" in flags:
        args.remove("--steps"), args.remove("2")
    run([*args, *flags])
    assert len(sample_spy) == 1
    seen = sample_spy[0]
    assert {k: seen.get(k) for k in expected} == expected
    assert not {"eta", "s_noise", "noise", "order", "grid_options", "sigmas"} - set(expected) & set(seen)


def test_sigmas_flag_gives_the_sigmas_samples(inputs, tmp_path):
    """--sigmas samples equal the pipeline's sigmas= samples, and differ from the default grid's."""
    from controlnet.cli import fit, generate, load_pipeline

    sig = "14.6,2.9,0.3,0"
    paths = run(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--num_images", "1", "--seed", "3",
                 "--sigmas", sig, "--out", str(tmp_path / "s"), *FAST[2:]])
    cond, pipe = fit(read(inputs / "cond.png"), SIZE, SIZE), load_pipeline()
    direct = generate(pipe, PROMPT, cond, 1, 3, height=SIZE, width=SIZE,
                      sample_options={"sigmas": [float(s) for s in sig.split(",")]})
    default = generate(pipe, PROMPT, cond, 1, 3, steps=3, height=SIZE, width=SIZE)
    assert np.abs(read(paths[1]).astype(int) - direct[0].astype(int)).max() <= 1
    assert np.abs(read(paths[1]).astype(int) - default[0].astype(int)).mean() > 1


@pytest.mark.parametrize("flags, msg", [
    (["--time_grid", "log_snr", "--rho", "5"], r"--rho is not an option of time grid 'log_snr'; its options: --t_max"),
    (["--sampler", "ddim", "--shift", "3"], r"--shift is not an option of time grid '\w+' \(the default grid here; "
                                            r"pick one with --time_grid\); its options: "),
    (["--time_grid", "blend", "--rho", "5"], r"--rho is not an option of time grid 'blend'; its options: --t_max\n"),
    (["--time_grid", "karras", "--sigma_min", "5", "--sigma_max", "1"], r"0 < sigma_min < sigma_max"),
    (["--sampler", "dpmpp_2m", "--eta", "0.5"], r"--eta is not an option of --sampler dpmpp_2m; its options: none"),
    (["--sampler", "ddim", "--order", "2"], r"--order is not an option of --sampler ddim; its options: --eta"),
    (["--sigmas", "3,1,0", "--time_grid", "karras"], r"--sigmas is a complete time grid: drop --time_grid"),
    (["--sigmas", "3,1,0", "--rho", "3"], r"--sigmas is a complete time grid: drop .*--rho"),
    (["--sigmas", "3,x,0"], r"--sigmas must be comma-separated numbers ending at 0"),
    (["--sigmas", "3,1"], r"sigmas must end at 0"),
    (["--sigmas", "1e6,1,0"], r"exceeds this schedule's largest EDM sigma"),
    (["--noise", "gaussian"], r"argument --noise: invalid choice: 'gaussian'"),
])
def test_grid_and_sampler_option_errors(flags, msg, inputs, tmp_path, capsys):
    import re

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--condition", str(inputs / "cond.png"), "--prompt", PROMPT, "--out", str(out), *FAST[2:], *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(msg, err), err
    assert not out.exists()

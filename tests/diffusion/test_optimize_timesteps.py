"""optimize_timesteps: grids fitted to an exact mixture denoiser beat the best named grid on held-out x_T; grid
files round-trip and are used by sample(time_grid=path.json) and cn-sample --time_grid path.json."""
import json
import warnings

import pytest
import torch

from diffusion import Discrete, FittedGrid, RectifiedFlow, load_time_grid, optimize_timesteps, prior_sample, sample
from diffusion.fitted_grid import named_grids, reference_solution, rmse
from diffusion.gmm import random_mixture
from diffusion.timesteps import check_timesteps, get_timesteps

SCHEDULE = Discrete("linear")
MIXTURE = random_mixture(16, 8, seed=3)
MARGIN = 0.7  # fitted held-out RMSE <= 0.7 x the best named grid's (measured: 0.3-0.4x, docs/sampling.md)


@pytest.fixture(scope="module")
def fitted():
    fn = MIXTURE.denoiser(SCHEDULE)
    x_fit = prior_sample((48, 16), SCHEDULE, 0, dtype=torch.float64)
    ref_fit = reference_solution(fn, SCHEDULE, x_fit)
    fit = optimize_timesteps(fn, SCHEDULE, "dpmpp_2m", 5, x_fit, reference=ref_fit, max_evals=120)
    return fn, x_fit, ref_fit, fit


def test_fitted_grid_is_valid_and_no_worse_than_its_start_on_the_fitting_set(fitted):
    fn, x_fit, ref_fit, fit = fitted
    ts = check_timesteps(fit.timesteps)
    assert len(ts) == 6 and fit.steps == 5 and ts[0] == SCHEDULE.t_max and ts[-1] == 0
    assert float(ts[-2]) >= 1.0 / SCHEDULE.num_train_timesteps  # never below the last trained time
    f = fit.fitted_on
    named = {k: rmse(sample(fn, x_fit, SCHEDULE, "dpmpp_2m", timesteps=g), ref_fit)
             for k, g in named_grids(SCHEDULE, 5).items()}
    assert f["init"] == min(named, key=named.get) and f["rmse_init"] == pytest.approx(min(named.values()))
    achieved = rmse(sample(fn, x_fit, SCHEDULE, "dpmpp_2m", timesteps=fit.timesteps), ref_fit)
    assert achieved == pytest.approx(f["rmse"]) and achieved < f["rmse_init"]
    assert f["evals"] <= 120


def test_fitted_grid_beats_the_best_named_grid_on_held_out_noise(fitted):
    fn, _, _, fit = fitted
    x_held = prior_sample((400, 16), SCHEDULE, 10_000, dtype=torch.float64)
    ref = reference_solution(fn, SCHEDULE, x_held)
    named = {k: rmse(sample(fn, x_held, SCHEDULE, "dpmpp_2m", timesteps=g), ref)
             for k, g in named_grids(SCHEDULE, 5).items()}
    held = rmse(sample(fn, x_held, SCHEDULE, "dpmpp_2m", timesteps=fit.timesteps), ref)
    assert held < MARGIN * min(named.values()), (held, named)


def test_json_round_trip_and_sample_uses_the_file(fitted, tmp_path):
    fn, x_fit, _, fit = fitted
    path = fit.save(tmp_path / "grid.json")
    data = json.loads(path.read_text())
    assert data["sampler"] == "dpmpp_2m" and data["steps"] == 5 and data["schedule"] == repr(SCHEDULE)
    assert {"timesteps", "fitted_on", "created"} <= set(data) and data["fitted_on"]["init"] == fit.fitted_on["init"]
    back = load_time_grid(path, steps=5, schedule=SCHEDULE, sampler="dpmpp_2m")
    assert torch.equal(back.timesteps, fit.timesteps)  # bit-exact: JSON keeps every float64 digit
    direct = sample(fn, x_fit, SCHEDULE, "dpmpp_2m", timesteps=fit.timesteps)
    for kw in ({}, {"steps": 5}):  # steps read from the file, or given and equal
        assert torch.equal(sample(fn, x_fit, SCHEDULE, "dpmpp_2m", time_grid=str(path), **kw), direct)
    assert torch.equal(sample(fn, x_fit, SCHEDULE, "dpmpp_2m", time_grid=path), direct)  # a Path works too
    assert not torch.equal(sample(fn, x_fit, SCHEDULE, "dpmpp_2m", steps=5), direct)  # it is not the default grid


def test_grid_file_errors(fitted, tmp_path):
    fn, x_fit, _, fit = fitted
    path = fit.save(tmp_path / "grid.json")
    with pytest.raises(ValueError, match=r"holds a 5-step grid but steps=10 was asked for; pass steps=5 or leave it unset"):
        sample(fn, x_fit, SCHEDULE, "dpmpp_2m", steps=10, time_grid=str(path))
    with pytest.raises(ValueError, match=r"fitted for schedule Discrete\(beta_schedule='linear'.* not RectifiedFlow"):
        sample(fn, x_fit, RectifiedFlow(), "dpmpp_2m", time_grid=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        sample(fn, x_fit, SCHEDULE, time_grid=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="a .json grid file is used as written"):
        sample(fn, x_fit, SCHEDULE, time_grid=str(path), grid_options={"rho": 7})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"timesteps": [1.0, 0.5, 0.7, 0.0]}))
    with pytest.raises(ValueError, match="bad.json is not a valid grid.*strictly decreasing"):
        load_time_grid(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a valid grid"):
        load_time_grid(bad)
    with pytest.raises(ValueError, match="must end in .json"):
        fit.save(tmp_path / "grid.txt")
    with pytest.warns(UserWarning, match="fitted for sampler 'dpmpp_2m'; using it with 'unipc'"):
        sample(fn, x_fit, SCHEDULE, "unipc", time_grid=str(path))
    hand = tmp_path / "hand.json"  # a hand-written grid needs only its times
    hand.write_text(json.dumps({"timesteps": [1.0, 0.3, 0.05, 0.0]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sample(fn, x_fit, SCHEDULE, "unipc", time_grid=str(hand))
    assert torch.equal(out, sample(fn, x_fit, SCHEDULE, "unipc", timesteps=[1.0, 0.3, 0.05, 0.0]))


def test_bad_fit_arguments():
    fn = MIXTURE.denoiser(SCHEDULE)
    x = prior_sample((4, 16), SCHEDULE, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match="injects noise"):
        optimize_timesteps(fn, SCHEDULE, "ddpm", 3, x, reference=x, max_evals=5)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        optimize_timesteps(fn, SCHEDULE, "dpmpp_2m", 1, x)
    with pytest.raises(ValueError, match="unknown sampler"):
        optimize_timesteps(fn, SCHEDULE, "nope", 3, x)
    with pytest.raises(ValueError, match="reference must be a tensor shaped like x_T"):
        optimize_timesteps(fn, SCHEDULE, "dpmpp_2m", 3, x, reference=x[:2])


def test_explicit_and_named_init(fitted):
    fn, x_fit, ref_fit, _ = fitted
    start = get_timesteps("uniform", 4, SCHEDULE)
    fit = optimize_timesteps(fn, SCHEDULE, "ddim", 4, x_fit[:16], reference=ref_fit[:16], init=start, max_evals=30)
    assert fit.fitted_on["init"] == "explicit" and fit.fitted_on["rmse"] < fit.fitted_on["rmse_init"]
    fit = optimize_timesteps(fn, SCHEDULE, "ddim", 4, x_fit[:16], reference=ref_fit[:16], init="karras", max_evals=1)
    assert fit.fitted_on["init"] == "karras" and torch.equal(fit.timesteps, get_timesteps("karras", 4, SCHEDULE))
    assert isinstance(fit, FittedGrid)


def test_cn_sample_accepts_a_grid_file(tmp_path, capsys):
    """--time_grid path.json: steps read from the file, the same images as the same times given by name; a different
    --steps or a missing file exits 2 before anything is written."""
    from PIL import Image, ImageDraw

    from controlnet.cli import DEFAULT_MODEL, main, run
    from controlnet.pipeline import read_scheduler_config
    from diffusion import schedule_from_diffusers

    schedule = schedule_from_diffusers(read_scheduler_config(DEFAULT_MODEL))
    grid = FittedGrid(get_timesteps("log_snr", 2, schedule), "dpmpp_2m", 2, repr(schedule)).save(tmp_path / "g.json")
    edges = Image.new("RGB", (64, 64))
    ImageDraw.Draw(edges).ellipse((16, 16, 48, 48), outline=(255, 255, 255))
    edges.save(tmp_path / "cond.png")
    args = ["--condition", str(tmp_path / "cond.png"), "--prompt", "red circle with blue background", "--num_images",
            "1", "--seed", "3", "--height", "32", "--width", "32", "--no_progress", "--threads", "1"]
    from_file = run([*args, "--time_grid", str(grid), "--out", str(tmp_path / "a")])
    by_name = run([*args, "--time_grid", "log_snr", "--steps", "2", "--out", str(tmp_path / "b")])
    assert (Image.open(from_file[1]).tobytes() == Image.open(by_name[1]).tobytes())
    for extra, msg in ([["--steps", "3"], "holds a 2-step grid but steps=3"],
                       [["--time_grid", str(tmp_path / "none.json")], "none.json does not exist"]):
        with pytest.raises(SystemExit) as e:
            main([*args, "--time_grid", str(grid), *extra, "--out", str(tmp_path / "c")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
        assert not (tmp_path / "c").exists()


def test_search_stays_inside_the_schedule_near_t_max(fitted):
    """Regression: a log-SNR step below log-SNR(t_max) used to map past t = 1 on a table and raise."""
    fn, x_fit, ref_fit, _ = fitted
    fit = optimize_timesteps(fn, SCHEDULE, "ddim", 3, x_fit[:8], reference=ref_fit[:8], init=[1.0, 0.995, 0.4, 0.0],
                             max_evals=20)
    ts = check_timesteps(fit.timesteps)
    assert ts[0] == 1.0 and ts[1] < 1.0 and fit.fitted_on["rmse"] <= fit.fitted_on["rmse_init"]

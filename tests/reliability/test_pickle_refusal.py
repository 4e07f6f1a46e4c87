"""No code runs on resume: a pickle planted in any file of a checkpoint (or in a cache) is refused with a clear
error, before anything unpickles it, in all three trainers and in eval_digits' classifier cache.

The payload is a real exploit: unpickling it with weights_only=False executes code that creates a marker file.
Every test asserts the marker does not exist afterwards (nothing ran) and the run directory is unchanged."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlnet.training import train as train_cn
from diffusion.training import checkpoint as C

from .common import RF, T2I, cn_cfg, reset_accelerate, rf_cfg, snapshot, t2i_cfg

REPO = Path(__file__).resolve().parents[2]
TRAINERS = {"rf": (RF.train, rf_cfg, "."), "cn": (train_cn, cn_cfg, "."),
            "t2i": (T2I.train, t2i_cfg, ".")}
# files a checkpoint of an older version (accelerate.register_for_checkpointing) or accelerate itself may hold
LEGACY = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "scheduler.bin", "pytorch_model.bin",
          "random_states_1.pkl")
TRIED: dict = {}


class Payload:
    """Unpickling this (weights_only=False) runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant(path: Path, marker: Path, raw: bool = False) -> None:
    """A torch.save zip (what accelerate writes) or a raw pickle holding the payload, at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw:
        path.write_bytes(pickle.dumps({"state": Payload(marker)}))
    else:
        torch.save({"state": Payload(marker), "step": 1}, path)


def test_payload_is_live(tmp_path):
    """Not vacuous: a full unpickle of the planted file does run the code."""
    plant(tmp_path / "x.pkl", tmp_path / "marker")
    torch.load(tmp_path / "x.pkl", weights_only=False)
    assert (tmp_path / "marker").read_text() == "ran"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished 1-step run of each trainer, with one checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    for name, (train, make, _) in TRAINERS.items():
        reset_accelerate()
        steps = {"max_train_steps": 1} if name == "rf" else {"max_train_steps": 1}
        train(make(root / name, checkpointing_steps=1, **steps))
    reset_accelerate()
    return root


@pytest.mark.parametrize("name", list(TRAINERS))
def test_planted_pickle_in_every_checkpoint_file_is_refused(runs, tmp_path, name):
    train, make, sub = TRAINERS[name]
    run = tmp_path / name
    shutil.copytree(runs / name, run)
    ckpt = C.resolve_checkpoint("latest", run / sub)
    positions = sorted({str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} | set(LEGACY))
    assert {"optimizer.bin", "random_states_0.pkl", "model.safetensors", "trainer_state.json"} <= set(positions)
    steps = {"max_train_steps": 2} if name == "rf" else {"max_train_steps": 2}
    refused = []
    for rel in positions:
        marker = tmp_path / f"marker-{name}-{rel.replace('/', '_')}"
        target = ckpt / rel
        original = target.read_bytes() if target.exists() else None
        plant(target, marker, raw=rel.endswith(".pkl") and original is None)
        before = snapshot(run)
        reset_accelerate()
        with pytest.raises(ValueError, match=r"refusing to unpickle") as e:
            train(make(run, checkpointing_steps=1, resume_from_checkpoint="latest", **steps))
        assert rel in str(e.value), str(e.value)
        if rel.endswith((".bin", ".pkl")):  # a torch pickle: the opt-in is named (a pickle elsewhere is never loaded)
            assert "--allow_pickle" in str(e.value), str(e.value)
        assert not marker.exists(), f"{name}: the payload in {rel} ran"
        assert snapshot(run) == before, f"{name}: {rel}: the run directory changed"
        refused.append(rel)
        if original is None:
            target.unlink()
        else:
            target.write_bytes(original)
    TRIED[name] = (len(refused), len(positions))
    assert refused == positions
    # the restored checkpoint still resumes: the refusals changed nothing
    reset_accelerate()
    res = train(make(run, checkpointing_steps=1, resume_from_checkpoint="latest", **steps))
    assert res["step"] == 2


def test_allow_pickle_skips_the_refusal_but_unpickles_nothing_unneeded(runs, tmp_path):
    """--allow_pickle accepts a checkpoint with a pickle-only file; files no state is read from stay unread."""
    run = tmp_path / "rf"
    shutil.copytree(runs / "rf", run)
    ckpt = C.resolve_checkpoint("latest", run)
    marker = tmp_path / "marker"
    plant(ckpt / "scheduler.bin", marker)
    res = RF.train(rf_cfg(run, max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest", allow_pickle=True))
    assert res["step"] == 2 and not marker.exists()


def test_cli_exits_2_and_runs_nothing(runs, tmp_path):
    run = tmp_path / "rf"
    shutil.copytree(runs / "rf", run)
    marker = tmp_path / "marker"
    plant(C.resolve_checkpoint("latest", run) / "custom_checkpoint_1.pkl", marker)
    cmd = [sys.executable, str(REPO / "scripts" / "train_rf_dit.py"), "--output_dir", str(run), "--model", "DiT-Tiny/4",
           "--train_batch_size", "8", "--max_train_steps", "2", "--progress_bar", "false", "--report_to", "none",
           "--validation_steps", "0", "--samples_per_class", "1", "--validation_inference_steps", "2", "--lr_warmup_steps", "2",
           "--checkpointing_steps", "1000", "--resume_from_checkpoint", "latest"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "refusing to unpickle" in proc.stderr and "custom_checkpoint_1.pkl" in \
        proc.stderr and "--allow_pickle" in proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- caches
def _eval_digits():
    import eval_digits  # scripts/ is on sys.path (tests.controlnet.sd_fixtures)

    return eval_digits


def test_digit_classifier_cache_is_not_a_pickle(tmp_path):
    """The cache is safetensors: a pickle planted where the cache lives is refused, one at the old pickle cache's
    name is never read; the cached weights predict exactly like the sklearn MLP they come from."""
    import warnings

    import sklearn
    from sklearn.neural_network import MLPClassifier

    from diffusion.training.data import load_digits_images

    E = _eval_digits()
    x, y = load_digits_images(8, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 5 iterations do not converge: the weights only need to be some MLP's
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=5, random_state=0).fit(x.flatten(1).numpy(), y.numpy())
    E.DigitMLP.from_sklearn(clf).save(tmp_path / "mlp.safetensors")
    mlp = E.DigitMLP.load(tmp_path / "mlp.safetensors")
    probe = torch.cat([x, torch.rand(200, 1, 8, 8) * 2 - 1]).flatten(1).numpy()
    assert (mlp.predict(probe) == clf.predict(probe)).all()

    marker = tmp_path / "marker"
    plant(tmp_path / f"digit_mlp_8px_sklearn{sklearn.__version__}.pkl", marker, raw=True)  # the old cache's name
    E.digit_classifier(8, tmp_path)  # trains and caches; the old pickle is never read
    assert not marker.exists()
    (cache,) = tmp_path.glob("digit_mlp_8px_*.safetensors")
    plant(cache, marker, raw=True)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*digit_mlp_8px.*delete it"):
        E.digit_classifier(8, tmp_path)
    plant(cache, marker)  # torch zip format
    with pytest.raises(ValueError, match=r"refusing to unpickle"):
        E.digit_classifier(8, tmp_path)
    assert not marker.exists()


def test_latent_cache_is_never_unpickled(tmp_path):
    from diffusion.models.latents import LatentDataset

    plant(tmp_path / "latents.safetensors", tmp_path / "marker")
    assert LatentDataset.stamp_of(tmp_path / "latents.safetensors") is None  # not a cache: rebuilt, never unpickled
    assert not (tmp_path / "marker").exists()


def test_zz_report(capsys):
    """Figures for docs/RELIABILITY.md (run with -s): planted pickles refused / tried, per trainer."""
    if TRIED:
        with capsys.disabled():
            total = [sum(v[i] for v in TRIED.values()) for i in (0, 1)]
            print(f"\nplanted pickles refused / tried: {total[0]}/{total[1]} {json.dumps(TRIED)}")

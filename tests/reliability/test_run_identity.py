"""Resume never picks up another run: every checkpoint records its run id and resolved config; a resume whose
config differs (outside a small allow-list) is refused naming the keys, a fresh run in a directory that holds
checkpoints is refused unless it resumes or overwrites, and --overwrite_output_dir removes the old run's
checkpoints so a later `latest` can only find the new run's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controlnet.training import train as train_cn
from diffusion.training import checkpoint as C
from diffusion.training.rundir import RESUME_MAY_CHANGE, config_changes

from .common import RF, T2I, cn_cfg, reset_accelerate, rf_cfg, snapshot, t2i_cfg

REPO = Path(__file__).resolve().parents[2]


def manifest(ckpt) -> dict:
    return json.loads((Path(ckpt) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """The old run: seed 0, lr 1e-3, checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("old")
    reset_accelerate()
    RF.train(rf_cfg(root / "run", max_train_steps=2, checkpointing_steps=1, learning_rate=1e-3, seed=0))
    reset_accelerate()
    return root / "run"


def test_fresh_run_over_old_checkpoints_is_refused(old_run, tmp_path):
    """The issue's case: a new run (other seed and lr) started in the old run's directory. Before: it trained on,
    and a resume after a kill picked the OLD run's newer checkpoint. Now it fails at once, changing nothing."""
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"(?s)already holds checkpoints of an earlier run.*checkpoint-00000002.*"
                                         r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        RF.train(rf_cfg(run, max_train_steps=1, checkpointing_steps=1, learning_rate=5e-4, seed=1))
    assert snapshot(run) == before  # config.yaml not rewritten


def test_resume_with_another_config_is_refused_naming_the_keys(old_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"(?s)checkpoint-00000002 was saved by run [0-9a-f]+ with another config: "
                                         r"learning_rate: 0\.001 -> 0\.0005; seed: 0 -> 1.*--allow_config_change"):
        RF.train(rf_cfg(run, max_train_steps=3, checkpointing_steps=1, learning_rate=5e-4, seed=1,
                        resume_from_checkpoint="latest"))
    assert snapshot(run) == before
    # the explicit override resumes (and says what differs); later checkpoints record the new config, same run id
    res = RF.train(rf_cfg(run, max_train_steps=3, checkpointing_steps=1, learning_rate=5e-4, seed=1,
                          resume_from_checkpoint="latest", allow_config_change=True))
    assert res["step"] == 3
    old, new = manifest(run / "checkpoint-00000002"), manifest(res["checkpoint"])
    assert new["run_id"] == old["run_id"] and new["config"]["seed"] == 1 and old["config"]["seed"] == 0


def test_allowed_keys_may_change_on_resume(old_run, tmp_path):
    """max_steps, cadence, output_dir (a checkpoint copied elsewhere) and the resume flags are on the allow-list."""
    run = tmp_path / "elsewhere"
    (run).mkdir(parents=True)
    shutil.copytree(old_run / "checkpoint-00000002", run / "checkpoint-00000002")
    res = RF.train(rf_cfg(run, max_train_steps=4, checkpointing_steps=2, logging_steps=3, learning_rate=1e-3, seed=0,
                          resume_from_checkpoint="latest", allow_pickle=True))
    assert res["step"] == 4 and len(res["losses"]) == 2
    assert manifest(res["checkpoint"])["run_id"] == manifest(old_run / "checkpoint-00000002")["run_id"]


def test_config_changes_and_allow_list():
    saved = {"seed": 0, "adam_betas": [0.9, 0.999], "max_train_steps": 10, "output_dir": "a", "gone": 1, "lr": 1e-3}
    now = {"seed": 0, "adam_betas": (0.9, 0.99), "max_train_steps": 20, "output_dir": "b", "new": 2, "lr": 1e-3}
    # keys only one side has (added or removed by another version of the code) are not compared
    assert config_changes(saved, now) == {"adam_betas": ([0.9, 0.999], [0.9, 0.99])}
    assert config_changes({"sec": {"seed": 0, "max_train_steps": 1}}, {"sec": {"seed": 1, "max_train_steps": 2}}) == \
        {"sec.seed": (0, 1)}
    assert {"max_train_steps", "num_train_epochs", "output_dir", "resume_from_checkpoint", "checkpointing_steps",
            "allow_pickle", "allow_config_change", "overwrite_output_dir"} <= RESUME_MAY_CHANGE
    assert not {"seed", "learning_rate", "model", "data_dir", "train_batch_size"} & RESUME_MAY_CHANGE


def test_overwrite_output_dir_starts_over_and_latest_finds_only_the_new_run(old_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    old_id = manifest(old_run / "checkpoint-00000002")["run_id"]
    kw = dict(checkpointing_steps=1, learning_rate=5e-4, seed=1)
    first = RF.train(rf_cfg(run, max_train_steps=1, overwrite_output_dir=True, **kw))  # then "killed" after step 1
    assert [p.name for _, p in C.list_checkpoints(run)] == ["checkpoint-00000001"]
    new_id = manifest(first["checkpoint"])["run_id"]
    assert new_id != old_id
    res = RF.train(rf_cfg(run, max_train_steps=2, resume_from_checkpoint="latest", **kw))
    assert res["step"] == 2 and len(res["losses"]) == 1 and manifest(res["checkpoint"])["run_id"] == new_id
    with pytest.raises(ValueError, match=r"--overwrite_output_dir and --resume_from_checkpoint"):
        RF.train(rf_cfg(run, max_train_steps=2, resume_from_checkpoint="latest", overwrite_output_dir=True, **kw))


def test_legacy_checkpoint_without_identity_needs_the_override(old_run, tmp_path):
    """A checkpoint written before run identities were recorded cannot be checked: refused unless overridden."""
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    for _, p in C.list_checkpoints(run):
        (p / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"records no run config .*--allow_config_change"):
        RF.train(rf_cfg(run, max_train_steps=3, checkpointing_steps=1, resume_from_checkpoint="latest"))
    res = RF.train(rf_cfg(run, max_train_steps=3, checkpointing_steps=1, resume_from_checkpoint="latest",
                          allow_config_change=True))
    assert res["step"] == 3


@pytest.mark.parametrize("name", ["cn", "t2i"])
def test_other_trainers_refuse_a_fresh_run_and_a_changed_config(tmp_path, name):
    train, make = {"cn": (train_cn, cn_cfg), "t2i": (T2I.train, t2i_cfg)}[name]
    steps = "max_train_steps"
    train(make(tmp_path / "run", checkpointing_steps=1, **{steps: 1}))
    before = snapshot(tmp_path / "run")
    reset_accelerate()
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run"):
        train(make(tmp_path / "run", checkpointing_steps=1, seed=5, **{steps: 2}))
    reset_accelerate()
    with pytest.raises(ValueError, match=r"with another config: seed: 0 -> 5"):
        train(make(tmp_path / "run", checkpointing_steps=1, seed=5, resume_from_checkpoint="latest", **{steps: 2}))
    assert snapshot(tmp_path / "run") == before
    reset_accelerate()
    res = train(make(tmp_path / "run", checkpointing_steps=1, resume_from_checkpoint="latest", **{steps: 2}))
    assert res["step"] == 2


def test_cli_refusal_exits_2(old_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    cmd = [sys.executable, str(REPO / "scripts" / "train_rf_dit.py"), "--output_dir", str(run), "--model", "DiT-Tiny/4",
           "--train_batch_size", "8", "--max_train_steps", "1", "--progress_bar", "false", "--report_to", "none",
           "--validation_steps", "0", "--samples_per_class", "1", "--validation_inference_steps", "2", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train_rf_dit.py: error: " in proc.stderr and "--overwrite_output_dir" in proc.stderr

"""One run per output_dir: the main process holds an exclusive flock on output_dir/run.lock (with its pid and host)
for the run's lifetime; a second run fails at once naming the holder; a lock left by a killed run does not block
(the OS drops a dead process's flock)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlnet.training import train as train_cn
from diffusion.training.rundir import LOCK_NAME, RunLock, exclusive_output_dir

from .common import RF, T2I, cn_cfg, rf_cfg, t2i_cfg

REPO = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from diffusion.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); " \
       "print('locked', flush=True); time.sleep(600)"


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that takes the run lock of `out` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("name", ["rf", "cn", "t2i"])
def test_second_run_fails_at_once_naming_the_holder(tmp_path, name):
    train, make = {"rf": (RF.train, rf_cfg), "cn": (train_cn, cn_cfg), "t2i": (T2I.train, t2i_cfg)}[name]
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=rf"(?s)output_dir {out} is in use by another run: pid {holder.pid} on "
                                             rf"host {socket.gethostname()}.*run\.lock.*another --output_dir"):
            train(make(out, max_train_steps=1) if name != "rf" else make(out, max_train_steps=1))
        assert time.perf_counter() - t0 < 2.0  # at once: before any model or data is loaded
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file is still there, but its flock died with it: the next run starts
    assert (out / LOCK_NAME).exists()
    steps = {"max_train_steps": 1} if name == "rf" else {"max_train_steps": 1}
    assert train(make(out, checkpointing_steps=1, **steps))["step"] == 1
    assert not (out / LOCK_NAME).exists()  # released (and removed) when the run ends


def test_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        RF.train(rf_cfg(out, dataset="folder", data_dir=str(tmp_path / "empty")))
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):  # nobody holds it
        assert (out / LOCK_NAME).read_text().startswith("{")


def test_only_the_main_process_locks(tmp_path, monkeypatch):
    seen = []

    @exclusive_output_dir
    def train(cfg):
        seen.append((cfg.output_dir / LOCK_NAME).exists())

    class Cfg:
        output_dir = tmp_path

    monkeypatch.setenv("RANK", "1")
    with RunLock(tmp_path):  # held by "rank 0": a non-main rank neither takes nor waits for it
        train(Cfg())
    monkeypatch.setenv("RANK", "0")
    train(Cfg())
    assert seen == [True, True]
    with RunLock(tmp_path), pytest.raises(ValueError, match="in use by another run"):
        train(Cfg())


def test_cli_second_run_exits_2(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        cmd = [sys.executable, str(REPO / "scripts" / "train_rf_dit.py"), "--output_dir", str(out), "--model",
               "DiT-Tiny/4", "--max_train_steps", "1", "--progress_bar", "false", "--report_to", "none"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train_rf_dit.py: error: output_dir {out} is in use by another run: pid {holder.pid}" in proc.stderr

"""Crash-safe checkpoints (diffusion.training.checkpoint): SIGKILL mid-save, fsync order, pruning, re-saving a step."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.training import checkpoint as C

from . import saver

REPO = Path(__file__).resolve().parents[2]


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def small_state(acc, value: float = 1.0):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return acc.prepare(model, opt)


def save(acc, root, step, model, limit=None, **kw):
    def extra(d):
        C.save_weights(acc.unwrap_model(model).state_dict(), d / "weights.safetensors")
    return C.save_checkpoint(acc, root, step, {"marker": step}, extra, limit, **kw)


def test_sigkill_during_save_keeps_latest_complete(tmp_path):
    """A real save SIGKILLed at random moments (and once deterministically mid-checkpoint), 11 times: after
    each kill 'latest' is the newest complete checkpoint, every complete checkpoint loads fully with the
    values of its step, earlier ones are intact, and progress never goes backwards (total limit 2)."""
    root = tmp_path / "ckpts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.saver", str(root)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(0)
    rounds = [("fast", 0.0, 3), ("slow", 0.0, 1)] + [("fast", rng.uniform(0, 0.15), rng.randint(1, 3))
                                                     for _ in range(8)] + [("slow", 0.0, 1)]
    acc = accelerator()
    model, opt, blob = saver.build(acc)
    last, mid_write = 0, 0
    try:
        for mode, delay, n in rounds:
            proc.stdin.write(f"round {delay} {mode} {n}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            said = json.loads(line)["said"]
            assert not any(s.startswith("corrupt") for s in said), said
            assert said[0] == f"resumed {last}", said  # resumed exactly where the previous round got to
            mid_write += any(root.glob(".tmp-checkpoint-*"))
            ckpts = C.list_checkpoints(root)
            # the limit (2) never leaves zero complete checkpoints; 3 when killed between the rename and the pruning
            assert 1 <= len(ckpts) <= 3, (said, ckpts)
            latest = C.resolve_checkpoint("latest", root)
            assert latest == ckpts[-1][1] and ckpts[-1][0] >= last
            for step, path in ckpts:  # every complete checkpoint loads fully, with its own values
                assert C.load_checkpoint(acc, path, {"blob": blob})["marker"] == step
                assert saver.values_ok(model, opt, blob, step), path
                w, _ = C.load_weights(path / "weights.safetensors")
                assert all(bool((t == step).all()) for t in w.values())
            last = ckpts[-1][0]
        assert mid_write >= 2  # the slow rounds (at least) were killed mid-checkpoint
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    C.remove_incomplete(root)
    assert sorted(p.name for p in root.iterdir()) == [p.name for _, p in C.list_checkpoints(root)]


def test_files_and_directories_fsynced_before_rename(tmp_path, monkeypatch):
    """Every file of the checkpoint and its directory are fsynced before the rename; the root after it."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to map file descriptors to paths")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    acc = accelerator()
    model, _ = small_state(acc)
    final = save(acc, tmp_path, 7, model)
    tmp = str(tmp_path / ".tmp-checkpoint-00000007")
    rename = events.index(("replace", tmp, str(final)))
    synced = {p for kind, p, *_ in events[:rename] if kind == "fsync"}
    files = {str(p).replace(str(final), tmp) for p in final.rglob("*")}
    assert files and files | {tmp} <= synced, sorted(files - synced)
    assert ("fsync", str(tmp_path)) in events[rename:]


def test_total_limit_never_deletes_the_only_or_newest_checkpoint(tmp_path, monkeypatch):
    acc = accelerator()
    model, _ = small_state(acc)
    for step in (1, 2, 3):
        save(acc, tmp_path, step, model, limit=1)
        assert [s for s, _ in C.list_checkpoints(tmp_path)] == [step]
    # an older run left a higher step here: the checkpoint just written survives its own pruning
    shutil.copytree(tmp_path / "checkpoint-00000003", tmp_path / "checkpoint-00000100")
    save(acc, tmp_path, 4, model, limit=1)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [4, 100]
    # a crash while deleting a pruned checkpoint never leaves a half-deleted 'checkpoint-*' that looks complete
    real_rmtree = shutil.rmtree

    def crash_midway(path, *a, **kw):
        if Path(path).name.startswith(".del-"):
            next(Path(path).glob("*.safetensors")).unlink()
            raise KeyboardInterrupt("killed while pruning")
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(C.shutil, "rmtree", crash_midway)
    shutil.rmtree(tmp_path / "checkpoint-00000100")
    with pytest.raises(KeyboardInterrupt):
        save(acc, tmp_path, 5, model, limit=1)
    monkeypatch.undo()
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [5]
    assert C.load_checkpoint(acc, C.resolve_checkpoint("latest", tmp_path))["marker"] == 5
    C.remove_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000005"]


def test_crash_while_resaving_a_step_restores_the_old_one(tmp_path, monkeypatch):
    """Re-saving step N moves the old checkpoint-N aside first; a crash between the two renames leaves it as
    .old-checkpoint-N, which remove_incomplete (run by the trainers at start) moves back."""
    acc = accelerator()
    model, _ = small_state(acc, 1.0)
    save(acc, tmp_path, 3, model)
    real_replace = os.replace

    def crash_on_second(a, b):  # after checkpoint-3 -> .old-checkpoint-3, before .tmp-checkpoint-3 -> checkpoint-3
        if Path(a).name == ".tmp-checkpoint-00000003":
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(a, b)

    with torch.no_grad():
        acc.unwrap_model(model).weight.fill_(2.0)
    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save(acc, tmp_path, 3, model)
    monkeypatch.undo()
    assert C.resolve_checkpoint("latest", tmp_path) is None  # nothing half-written is ever 'latest'
    C.remove_incomplete(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000003"]
    w, _ = C.load_weights(tmp_path / "checkpoint-00000003" / "weights.safetensors")
    assert bool((w["weight"] == 1.0).all())  # the old, complete one

"""The trainers' command-line boundary (diffusion.training.preflight): exit statuses, checks that run before any model is
loaded, the configurable DDP timeout. The bad-input cases themselves are rows of test_bad_inputs.py (TRAINER_CLI)."""
from __future__ import annotations

from datetime import timedelta

import pytest

import controlnet.training as CT
from diffusion.training.guards import NonFiniteError
from diffusion.training.preflight import check_memory, cli_errors

from .common import RF, cn_cfg, rf_cfg


@pytest.mark.parametrize("exc, code", [(ValueError("bad flag"), 2), (FileNotFoundError("no such file"), 2),
                                       (NonFiniteError("non-finite loss", 3), 1)])
def test_cli_errors_exit_status_and_message(capsys, exc, code):
    with pytest.raises(SystemExit) as e, cli_errors("prog.py"):
        raise exc
    assert e.value.code == code and capsys.readouterr().err == f"prog.py: error: {exc}\n"


def test_other_exceptions_keep_their_traceback():
    with pytest.raises(KeyError), cli_errors("prog.py"):  # a bug, not bad input
        raise KeyError("x")


def test_memory_check_names_the_numbers():
    check_memory({"input batch": 2 * 1024 ** 3}, "lower it", total=4 * 1024 ** 3)
    with pytest.raises(ValueError, match=r"more than 6 GiB \(input batch 2 GiB, grid 4 GiB; a lower bound, before any "
                                         r"model activation\) but the memory holds 4 GiB; lower it"):
        check_memory({"input batch": 2 * 1024 ** 3, "grid": 4 * 1024 ** 3}, "lower it", total=4 * 1024 ** 3)


def test_controlnet_data_errors_come_before_model_loading(tmp_path, monkeypatch):
    """A missing caption column fails before the (large) SD components are loaded."""
    import json
    import shutil

    from .common import fill_data

    data = tmp_path / "data"
    shutil.copytree(fill_data(), data)
    (data / "prompt.json").unlink()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "target/0.png", "conditioning_image": "source/0.png",
                                                     "prompt": "x"}) + "\n")

    def no_loading(*a, **k):
        raise AssertionError("models loaded before the data was checked")
    monkeypatch.setattr(CT, "load_components", no_loading)
    with pytest.raises(ValueError, match=r"no caption column 'text'"):
        CT.train(cn_cfg(tmp_path / "run", train_data_dir=str(data)))


@pytest.mark.parametrize("trainer", ["cn", "rf"])
def test_ddp_timeout_reaches_accelerate(tmp_path, monkeypatch, trainer):
    """--ddp_timeout seconds become accelerate's InitProcessGroupKwargs(timeout=...) (default 1800 s)."""
    import accelerate

    seen = []

    def init(self, *args, **kwargs):
        seen.append(kwargs.get("kwargs_handlers"))
        raise RuntimeError("stop after the Accelerator's arguments")
    monkeypatch.setattr(accelerate.Accelerator, "__init__", init)
    for timeout in (None, 123):
        kw = {} if timeout is None else {"ddp_timeout": timeout}
        cfg = cn_cfg(tmp_path / "cn", **kw) if trainer == "cn" else rf_cfg(tmp_path / "rf", **kw)
        with pytest.raises(RuntimeError, match="stop after"):
            (CT.train if trainer == "cn" else RF.train)(cfg)
    assert [h[0].timeout for h in seen] == [timedelta(seconds=1800), timedelta(seconds=123)]

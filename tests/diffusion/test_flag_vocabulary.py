"""One flag vocabulary (diffusers' example names) across every trainer: the shared flags each --help shows are the
same set, old names are refused with the new one, a tracker that is not installed and a warm-up longer than the run
are caught at start."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
import warnings
from pathlib import Path

import pytest

from diffusion.training.args import RENAMED, TrainingArgs, shared_flags
from diffusion.training.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import train_controlnet  # noqa: E402
import train_dit_controlnet  # noqa: E402
import train_rf_dit  # noqa: E402
import train_t2i  # noqa: E402

from controlnet.dit_training import TrainDiTControlNetConfig  # noqa: E402
from controlnet.t2i_training import TrainT2IConfig  # noqa: E402
from controlnet.training import TrainControlNetConfig  # noqa: E402
from diffusion.training.rf_dit import TrainConfig as RFDiTConfig  # noqa: E402

CONFIGS = {"train_rf_dit": RFDiTConfig, "train_controlnet": TrainControlNetConfig, "train_t2i": TrainT2IConfig,
           "train_dit_controlnet": TrainDiTControlNetConfig}
SCRIPTS = {"train_rf_dit": train_rf_dit, "train_controlnet": train_controlnet, "train_t2i": train_t2i,
           "train_dit_controlnet": train_dit_controlnet}
# the names diffusers' example trainers (train_controlnet.py, train_text_to_image.py) use for the same things
DIFFUSERS = {"output_dir", "seed", "train_batch_size", "num_train_epochs", "max_train_steps", "checkpointing_steps",
             "checkpoints_total_limit", "resume_from_checkpoint", "gradient_accumulation_steps",
             "gradient_checkpointing", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
             "lr_power", "use_8bit_adam", "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_weight_decay",
             "adam_epsilon", "max_grad_norm", "logging_dir", "allow_tf32", "report_to", "mixed_precision",
             "validation_steps", "tracker_project_name", "use_ema", "set_grads_to_none"}


def help_flags(name: str) -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        SCRIPTS[name].main(["--help"])
    assert e.value.code == 0
    return set(re.findall(r"^  --(\w+) ", out.getvalue(), flags=re.M))


def test_every_trainer_shows_the_same_shared_flags():
    shown = {name: help_flags(name) for name in SCRIPTS}
    shared = shared_flags()
    assert DIFFUSERS <= shared  # the shared set speaks diffusers' vocabulary
    for name, flags in shown.items():
        assert shared <= flags, (name, shared - flags)
    # the flags the trainers have in common are exactly the shared ones, with one meaning each
    common = set.intersection(*shown.values())
    assert common - shared <= {"resolution", "sampler"}, common - shared  # per-trainer: their own defaults and help
    assert {f.name for f in dataclasses.fields(TrainingArgs)} == shared


@pytest.mark.parametrize("trainer", sorted(CONFIGS))
@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_names_are_refused_with_the_new_one(trainer, old, tmp_path):
    new = RENAMED[old].split(" and ")[0]
    with pytest.raises(ConfigError, match=rf"config key '{old}' \(from command line\) was renamed .*--{new}"):
        parse_config(CONFIGS[trainer], [f"--{old}", "1"], exit_on_error=False)
    (tmp_path / "old.yaml").write_text(f"{old}: 1\n")
    with pytest.raises(ConfigError, match=rf"config key '{old}' \(from .*old\.yaml\) was renamed .*--{new}"):
        parse_config(CONFIGS[trainer], ["--config", str(tmp_path / "old.yaml")], exit_on_error=False)


def test_old_name_on_the_command_line_exits_2_with_the_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        train_rf_dit.main(["--max_steps", "10"])
    assert e.value.code == 2
    assert "train_rf_dit.py: error: config key 'max_steps' (from command line) was renamed" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_use_the_shared_names(config):
    text = (ROOT / "configs" / config).read_text()
    assert not [k for k in RENAMED if re.search(rf"^{k}:", text, flags=re.M)]


def test_warmup_longer_than_the_run_warns():
    from diffusion.training.loop import total_steps

    cfg = TrainingArgs(max_train_steps=10, lr_warmup_steps=50, lr_scheduler="cosine")
    with pytest.warns(UserWarning, match=r"lr_warmup_steps=50 is longer than the run \(10 optimizer steps\)"):
        assert total_steps(cfg, batches_per_epoch=3) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert total_steps(dataclasses.replace(cfg, lr_warmup_steps=10), 3) == 10
        assert total_steps(TrainingArgs(num_train_epochs=2, gradient_accumulation_steps=2), 5) == 6  # ceil(5/2) x 2


def test_a_tracker_that_is_not_installed_is_an_error_before_anything_is_written(tmp_path, monkeypatch):
    import accelerate.utils

    from diffusion.training import rf_dit

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    cfg = rf_dit.TrainConfig(output_dir=str(tmp_path / "run"), model="DiT-Tiny/4", max_train_steps=1,
                             report_to="tensorboard")
    with pytest.raises(ValueError, match=r"--report_to tensorboard needs the tensorboard package"):
        rf_dit.train(cfg)
    assert not (tmp_path / "run").exists()

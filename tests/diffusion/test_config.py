"""Config machinery (diffusion/training/config.py): YAML + type-checked overrides, errors, dry-run, help."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from diffusion.training.config import ConfigError, from_dict, load_config, parse_config, save_yaml, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Optim:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    """A test config."""

    learning_rate: float = field(default=3e-4, metadata={"help": "the LR"})
    max_steps: int = 100
    name: Optional[str] = None
    mode: Literal["uniform", "logit_normal"] = "uniform"
    ema: bool = False
    sizes: tuple[int, ...] = (16, 32)
    tags: list[str] = field(default_factory=list)
    model: str = field(default="a", metadata={"choices": ["a", "b"]})
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def parse(argv):
    return parse_config(Cfg, argv, exit_on_error=False)


def test_defaults_yaml_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("max_steps: 50\noptim:\n  lr: 2.0e-4\nsizes: [8, 16, 24]\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nmode: logit_normal\nlearning_rate: 1e-4\n")  # YAML reads 1e-4 as str
    assert parse([]) == Cfg()
    cfg = parse(["--config", str(child), "--max_steps=7", "--ema", "--name", "run1", "--optim.betas", "0.8,0.95",
                 "--tags=a,b"])
    assert cfg.max_steps == 7 and cfg.mode == "logit_normal" and cfg.learning_rate == 1e-4
    assert cfg.sizes == (8, 16, 24) and cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.8, 0.95)
    assert cfg.ema is True and cfg.name == "run1" and cfg.tags == ["a", "b"]
    # dashes, explicit booleans, none, bracketed sequences; later --config files override earlier ones
    over = tmp_path / "over.yaml"
    over.write_text("max_steps: 9\n")
    cfg = parse([f"--config={child}", "--config", str(over), "--ema", "false", "--name=none", "--sizes", "[1, 2]",
                 "--learning-rate", "5e-5"])
    assert cfg.max_steps == 9 and cfg.ema is False and cfg.name is None and cfg.sizes == (1, 2)
    assert cfg.learning_rate == 5e-5
    # command-line values win over files regardless of order
    assert parse(["--max_steps", "3", "--config", str(over)]).max_steps == 3


@pytest.mark.parametrize("argv,match", [
    (["--max_steps=1.5"], r"'max_steps' \(from command line\): expected int, got '1.5'"),
    (["--learning_rate", "fast"], r"'learning_rate'.*expected float"),
    (["--ema=maybe"], r"'ema'.*expected bool.*true/false"),
    (["--mode", "gaussian"], r"'mode'.*valid choices: \['uniform', 'logit_normal'\]"),
    (["--model", "c"], r"'model'.*valid: \['a', 'b'\]"),
    (["--optim.betas=1,2,3"], r"'optim.betas'.*2 items needed"),
    (["--max_steps=0"], r"max_steps must be >= 1"),
    (["--optim=1"], r"'optim' is a section"),
    (["stray"], r"unexpected argument 'stray'"),
    (["--max_steps"], r"missing value for --max_steps"),
])
def test_type_errors_name_key_and_type(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(argv)


def test_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse(["--lerning_rate=1e-3"])
    msg = str(e.value)
    assert "unknown config key 'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg
    assert "Valid keys:" in msg and "optim.lr" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 3\n")
    with pytest.raises(ConfigError, match=r"'max_step' \(from .*bad.yaml\); did you mean 'max_steps'"):
        parse(["--config", str(bad)])
    bad.write_text("max_steps: 3.5\n")
    with pytest.raises(ConfigError, match=r"'max_steps' \(from .*bad.yaml\): expected int, got 3.5"):
        parse(["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_exit_codes_and_messages(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--nope=1"], prog="prog")
    assert e.value.code == 2 and "prog: error: unknown config key 'nope'" in capsys.readouterr().err


def test_dry_run_prints_resolved_yaml(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--max_steps", "5", "--optim.lr=1e-2", "--dry-run"])
    assert e.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["max_steps"] == 5 and out["optim"] == {"lr": 0.01, "betas": [0.9, 0.999]}
    assert from_dict(Cfg, out) == Cfg(max_steps=5, optim=Optim(lr=0.01))


def test_help_lists_fields_with_help_text(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "A test config." in out
    assert "--learning_rate float  (default: 0.0003)" in out and "the LR" in out
    assert "--mode {uniform,logit_normal}" in out and "--name str | None" in out
    assert "--optim.lr float" in out and "peak learning rate" in out and "[choices: a, b]" in out


def test_round_trip_save_and_load(tmp_path):
    cfg = Cfg(max_steps=3, name="x", sizes=(1,), optim=Optim(betas=(0.5, 0.6)))
    path = save_yaml(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Cfg, path) == cfg
    d = to_dict(cfg)
    assert d["sizes"] == [1] and d["optim"]["betas"] == [0.5, 0.6]
    assert yaml.safe_load(to_yaml(cfg)) == d
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(Cfg, {**d, "old_key": 1})
    assert from_dict(Cfg, {**d, "old_key": 1}, strict=False) == cfg


def test_train_script_dry_run_and_help():
    """The trainer resolves its shipped YAML configs (a subprocess: also checks the script imports)."""
    script = ROOT / "scripts" / "train_rf_dit.py"
    out = subprocess.run([sys.executable, str(script), "--config", str(ROOT / "configs" / "rf_dit_digits.yaml"),
                          "--max_train_steps", "10", "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["max_train_steps"] == 10 and cfg["dataset"] == "digits" and cfg["prediction"] == "velocity"

"""Offline fixtures built once per test session by the real scripts: a tiny SD1.5-layout pipeline and fill data."""
import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import make_fill_dataset  # noqa: E402
import make_tiny_sd  # noqa: E402
import make_tiny_sd3  # noqa: E402
import make_tiny_sdxl  # noqa: E402

RES = 32  # pixels; latents are 4x4


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    d = Path(tempfile.mkdtemp(prefix="controlnet_fixtures_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.lru_cache(maxsize=None)
def tiny_sd(prediction_type: str = "epsilon") -> Path:
    """scripts/make_tiny_sd.py output (32 px, 4x4 latents); v_prediction: same weights, scheduler edited."""
    out = _root() / f"tiny-sd-{prediction_type}"
    if prediction_type == "epsilon":
        make_tiny_sd.make_tiny_sd(out, resolution=RES, seed=0)
    else:
        import json
        shutil.copytree(tiny_sd("epsilon"), out)
        f = out / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": prediction_type}))
    return out


@functools.lru_cache(maxsize=None)
def tiny_sdxl() -> Path:
    """scripts/make_tiny_sdxl.py output (32 px, 4x4 latents); its ControlNet is the sibling <dir>-controlnet."""
    return make_tiny_sdxl.make_tiny_sdxl(_root() / "tiny-sdxl", resolution=32, seed=0)


@functools.lru_cache(maxsize=None)
def tiny_sd3(t5: bool = True) -> Path:
    """scripts/make_tiny_sd3.py output (64 px, 16x8x8 latents), with or without T5; ControlNet in <dir>-controlnet."""
    return make_tiny_sd3.make_tiny_sd3(_root() / ("tiny-sd3" if t5 else "tiny-sd3-no-t5"), resolution=64, seed=0, t5=t5)


def controlnet_dir(pipeline_dir: Path) -> Path:
    return pipeline_dir.with_name(pipeline_dir.name + "-controlnet")


@functools.lru_cache(maxsize=None)
def fill_data(n: int = 32, size: int = RES, seed: int = 0, fmt: str = "both") -> Path:
    """scripts/make_fill_dataset.py output (read-only for tests: copy it before corrupting files)."""
    return make_fill_dataset.write_fill_dataset(_root() / f"fill-{n}-{size}-{seed}-{fmt}", n, size, seed, fmt)

import importlib.util

import pytest

if importlib.util.find_spec("rich"):  # rich.style draws from Python's `random` when first imported (by accelerate):
    import rich.style  # noqa: F401  do it now, not inside the first seeded run, so fresh runs' RNG states agree


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """A clean accelerate singleton per test (one intra-op thread comes from tests/conftest.py)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

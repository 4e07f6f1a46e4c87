import importlib.util

import pytest

if importlib.util.find_spec("rich"):  # rich.style draws from Python's `random` when first imported (by accelerate):
    import rich.style  # noqa: F401  do it now, not inside the first seeded run, so fresh runs' RNG states agree


@pytest.fixture(autouse=True)
def _fresh_accelerate(fresh_accelerate_state):
    """A clean accelerate singleton per test (tests/conftest.py; one intra-op thread comes from there too)."""
    yield

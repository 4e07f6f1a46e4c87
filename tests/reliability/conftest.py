import importlib.util

import pytest
import torch

if importlib.util.find_spec("rich"):  # rich.style draws from Python's `random` when first imported (by accelerate):
    import rich.style  # noqa: F401  do it now, not inside the first seeded run, so fresh runs' RNG states agree


@pytest.fixture(autouse=True)
def _one_thread_fresh_accelerate():
    """One intra-op thread (tiny models, shared cores, deterministic); a clean accelerate singleton per test."""
    from accelerate.state import AcceleratorState, GradientState

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(n)

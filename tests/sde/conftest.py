import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a shared 2-core box: intra-op threading only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

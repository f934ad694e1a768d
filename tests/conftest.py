"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a module's tests with one torch thread, restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

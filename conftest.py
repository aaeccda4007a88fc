"""Shared by every test file: one thread per test. The models are tiny, so threads gain
nothing, and other jobs (a benchmark, another test run) may share the CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

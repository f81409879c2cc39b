"""Test-wide settings: deterministic, single-threaded torch so the suite behaves the same on CI's 2 cores."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield

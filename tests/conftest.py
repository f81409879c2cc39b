"""Test-wide settings: deterministic, single-threaded torch so the suite behaves the same on CI's 2 cores."""

import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a test's process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Test-wide settings: deterministic, single-threaded torch so the suite behaves the same on CI's 2 cores; helpers the
tests share."""

import importlib.util
import socket
import sys
from pathlib import Path

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


def load_script(name: str):
    """scripts/<name>.py imported as a module (registered in sys.modules: dataclasses look their module up there)."""
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str]) -> int:
    """scripts/<name>.py's main(argv); the benchmarks turn autograd off process-wide, so it is turned back on."""
    try:
        return load_script(name).main(argv)
    finally:
        torch.set_grad_enabled(True)

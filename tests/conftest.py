"""Test-wide settings: deterministic, single-threaded torch so the suite behaves the same on CI's 2 cores; helpers the
tests share."""

import dataclasses
import functools
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def run_without_interpreter(*args: str, timeout: int = 600) -> str:
    """`python <args>` from the repository root in a fresh process without TRITON_INTERPRET (the suite's
    TRITON_INTERPRET=1 turns every `triton.jit` kernel into the interpreter's at import, which cannot be compiled):
    its stdout, or the test fails with the end of its stderr. For offline compiles (`compile_for`)."""
    root = Path(__file__).parents[1]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@functools.cache
def kernel_sass():
    """scripts/kernel_sass.py, loaded once per process (the offline compiles call it many times)."""
    return load_script("kernel_sass")


def compile_for(kernel, types: dict[str, str], arch: int = 90, num_warps: int = 4, **constexprs):
    """`scripts/kernel_sass.compile_triton` of `kernel` at the constexprs given as keywords (run it under
    `run_without_interpreter`)."""
    return kernel_sass().compile_triton(kernel, types, constexprs, num_warps, arch)


# The official DeepSeek-V4 `inference/` folder (model.py, and a pure-torch kernel.py beside it in place of the tilelang
# one) for the parity tests in tests/model, which skip where it is absent: it is not ours to ship.
OFFICIAL_INFERENCE = Path(os.environ.get("DSV4_OFFICIAL_INFERENCE", "/work/ref/inference"))
needs_official = pytest.mark.skipif(not (OFFICIAL_INFERENCE / "model.py").is_file(),
                                    reason="official DeepSeek-V4 inference/ not available (set DSV4_OFFICIAL_INFERENCE)")


def load_official(monkeypatch):
    """The official model.py as a module, run from its own folder (its `from kernel import ...` finds kernel.py)."""
    monkeypatch.syspath_prepend(str(OFFICIAL_INFERENCE))
    spec = importlib.util.spec_from_file_location("dsv4_official_model", OFFICIAL_INFERENCE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_args(official, cfg, **fields):
    """The official `ModelArgs` for our config: every field both dataclasses have (ours carry the official names)
    from `cfg`, `compress_ratios` with the MTP layer's trailing 0, then `fields`. Nothing rests on the official
    file's defaults, which differ between copies of it."""
    shared = {f.name for f in dataclasses.fields(official.ModelArgs)} & {f.name for f in dataclasses.fields(cfg)}
    args = {name: getattr(cfg, name) for name in shared} | {"compress_ratios": tuple(cfg.compress_ratios) + (0,)}
    return official.ModelArgs(**(args | fields))


@pytest.fixture
def interpreter_bf16(monkeypatch):
    """Triton 3.6's interpreter multiplies bfloat16 `tl.dot` operands as their raw uint16 storage and rounds float32
    to bfloat16 towards zero; make it widen dot operands to float32 first (exact, as the tensor cores' products are)
    and round to nearest even (as the GPU and torch do), so bf16 kernels can be checked on CPU."""
    from ascend.backends import cuda
    if not cuda.triton_runs_on("cpu"):
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def widened(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        data = interpreter._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def rounded(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
        return interpreter.TensorHandle(bits.view(np.uint16), tl.bfloat16)

    monkeypatch.setattr(builder, "create_dot", lambda self, a, b, *args: dot(self, widened(a), widened(b), *args))
    monkeypatch.setattr(builder, "cast_impl", rounded)

"""torch_npu operators on CPU: the wheel's published schemas with CPU kernels of their documented semantics.

    with installed() as torch_npu:          # sys.modules["torch_npu"] is the emulation inside
        y, rstd = torch_npu.npu_rms_norm(x, w, epsilon=1e-6)

Every operator is defined from its schema string in torch-npu's
`npu_native_functions_by_codegen.yaml` in a scratch torch.library namespace (`npu_emu`), so the
dispatcher binds arguments exactly as the real binding would: an unknown keyword, a wrong type or a
wrong number of arguments is rejected before any emulated kernel runs. The kernels (ops.py) follow
the Ascend/op-plugin documentation of each operator; shape-only Meta kernels (meta.py) let FakeTensor
tracing run through them. Nothing here has run on an Ascend NPU; see
docs/npu-emulation.md for what this proves and what it cannot.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from typing import Iterator

import torch
from torch.library import Library

from ascend.npu_emulation.meta import META
from ascend.npu_emulation.ops import EMULATED
from ascend.npu_emulation.schemas import TORCH_NPU_VERSION, SchemaUnavailable, load_schemas

NAMESPACE = "npu_emu"
_lock = threading.Lock()
_library: Library | None = None  # kept alive for the process: dropping it would unregister the ops

__all__ = ["EMULATED", "NAMESPACE", "SchemaUnavailable", "emulated_torch_npu", "installed", "register"]


def register() -> None:
    """Define every emulated operator from its published schema (once per process)."""
    global _library
    with _lock:
        if _library is not None:
            return
        schemas = load_schemas()
        lib = Library(NAMESPACE, "DEF")
        for name, kernel in EMULATED.items():
            schema = schemas[name]
            torch._C.parse_schema(schema)  # fail loudly here if a future wheel ships an unparsable schema
            lib.define(schema)
            lib.impl(name, kernel, "CPU")
            lib.impl(name, META[name], "Meta")
        _library = lib


def emulated_torch_npu() -> types.ModuleType:
    """A `torch_npu`-like module whose npu_xxx attributes are the emulated dispatcher operators."""
    register()
    module = types.ModuleType("torch_npu", f"CPU emulation of torch_npu {TORCH_NPU_VERSION} operators")
    module.__version__ = f"{TORCH_NPU_VERSION}+cpu-emulation"
    module.__emulated__ = True
    ops = getattr(torch.ops, NAMESPACE)
    for name in EMULATED:
        setattr(module, name, getattr(ops, name))
    return module


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Make `import torch_npu` return the emulation inside the block; restores what was there."""
    module = emulated_torch_npu()
    missing = object()
    previous = sys.modules.get("torch_npu", missing)
    sys.modules["torch_npu"] = module
    try:
        yield module
    finally:
        if previous is missing:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous

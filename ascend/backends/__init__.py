"""Operator backends: the `model.kernels.Kernels` table to use on a given device.

`get_kernels(device)` picks by `device.type`: 'npu' -> ascend.backends.npu (fused torch_npu operators, per-SoC
limits from `device.soc`), 'cuda' -> ascend.backends.cuda (Triton when importable), anything else -> the
pure-PyTorch REFERENCE.
Backend modules are imported only when chosen, so torch_npu / Triton are never touched on a machine without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from model.kernels import REFERENCE, Kernels

__all__ = ["get_kernels"]


def get_kernels(device: Any) -> Kernels:
    """Kernels for `device` (an ascend.device.Device or anything with `.type` and, for npu, `.soc`)."""
    kind = device.type
    if kind == "npu":
        from ascend.backends.npu import make_kernels

        return make_kernels(device.soc)
    if kind == "cuda":
        return importlib.import_module("ascend.backends.cuda").make_kernels()
    return REFERENCE

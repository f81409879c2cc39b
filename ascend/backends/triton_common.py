"""What the Triton kernel modules share (triton_moe, triton_sparse_attn): the dot precision rule, and a fix to
Triton 3.6's CPU interpreter, applied when this module is imported under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision for operands of `dtype`: float32 in full float32 ("ieee"), as torch's matmuls
    keep them by default; Triton's own default would be TF32 (about 1e-3 relative). Ignored for bf16 (exact
    products). Every Triton kernel of the backend that dots its inputs takes it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a tensor used as a Python int (a loop bound computed from a load, as in the
    expert kernels) into one with int(array), which numpy >= 2.4 refuses for a 1-element array
    (triton-lang/triton#9171; fixed upstream after 3.6, whose later interpreters differ elsewhere). The CPU checks
    (tests, the benchmarks' --quick) run Triton 3.6.0's interpreter, so the upstream fix is applied here: squeeze
    the array first. Compiled kernels never take this path."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":    # module import: once per process
    _interpreter_index_fix()

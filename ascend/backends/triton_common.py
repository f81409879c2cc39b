"""What the Triton kernel modules share: programmatic dependent launch (every kernel starts with
`after_previous_kernel` and is launched with `launch_options`), the SM count launch shapes are sized by, the dot
precision rule (triton_moe, triton_linear, triton_sparse_attn, triton_index_rotate), the arrival tickets by which the
last of a block's programs finishes its work in the same launch (the split-K end `store_rows` of triton_moe and
triton_linear, triton_argmax's pick among a row's chunks, triton_sparse_attn's chunked top-k), and a fix to Triton
3.6's CPU interpreter, applied when this module is imported under TRITON_INTERPRET=1."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

from ascend.device import stream_lane


INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")   # PTX cannot run: kernels emulate it

PDL = True
"""Launch the backend's kernels with programmatic dependent launch on sm_90+ (`launch_options`). A batch-1 decode
step is ~170 kernels of a few microseconds each, replayed from one CUDA graph: with PDL a kernel's programs are
scheduled while the previous kernel drains and wait for its results in `after_previous_kernel`, instead of the
launch starting only once the previous grid has finished (docs/performance.md has the measured effect)."""


@triton.jit
def after_previous_kernel(PDL: tl.constexpr):
    """The first statement of every Triton kernel of the backend (the Gluon one, `gluon_sparse_attn`, launches without
    PDL), given its PDL constexpr (`launch_options`). Launched
    with PDL, this kernel's programs may start while the previous kernel on the stream still runs:
    `griddepcontrol.wait` holds them until that kernel has finished and its writes are visible (nothing before it
    may read another kernel's output or write anything). Then `launch_dependents` lets the next kernel's programs be
    scheduled in turn. Compiled in only with PDL: the instructions exist from sm_90 on, and older targets refuse
    them."""
    if PDL and not INTERPRETING:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SMs, which launch shapes are sized by; CPU tensors come here only under Triton's interpreter
    (the tests): a nominal 8, so that split paths run there too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


@functools.cache
def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (the opt-in maximum per block; 48 KiB where the
    property is missing); CPU tensors come here only under Triton's interpreter, which has no such limit: a nominal
    227 KiB (an H100's or H200's)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 << 10))
    return 227 << 10


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """The NVIDIA compute capability of `device`, which kernels and settings are chosen by; (0, 0) for CPU tensors
    (the interpreter) and ROCm devices, which report their gfx numbers through the same call (an MI250's gfx90a
    reads (9, 0), an H100's)."""
    if device.type == "cuda" and torch.version.hip is None:
        return tuple(torch.cuda.get_device_capability(device))
    return (0, 0)


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    return capability(device)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch on `device`: the kernel's PDL constexpr (`after_previous_kernel`) and,
    where the GPU has PDL (NVIDIA, sm_90 on) and `PDL` is on, the launch flag with it."""
    pdl = PDL and _pdl_capable(device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision for operands of `dtype`: float32 in full float32 ("ieee"), as torch's matmuls
    keep them by default; Triton's own default would be TF32 (about 1e-3 relative). Ignored for bf16 (exact
    products). Every Triton kernel of the backend that dots its inputs takes it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def last_to_arrive(tickets_ptr, splits):
    """True in the last of the `splits` programs of this (program_id(0), program_id(1)) (they differ in
    program_id(2)) to get here, which then owns the block's reduction and resets its ticket for the next launch (the
    tickets are zero between launches). The barrier puts every thread's stores before the ticket; the ticket's
    acquire-release atomic, at GPU scope, makes them visible to the last program (CUTLASS's split-K semaphore does
    the same)."""
    tl.debug_barrier()
    ticket = tickets_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    last = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == splits - 1
    if last:
        tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_splits(part_ptr, y_ptr, at, ok, split_stride, SPLITS: tl.constexpr):
    """y[at] = the SPLITS float32 partials at part[s, at], added in split order (deterministic), read from L2
    (`.cg`): other programs wrote them."""
    total = tl.load(part_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLITS):
        total += tl.load(part_ptr + s * split_stride + at, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(y_ptr + at, total.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def store_part(y, y_ptr, part_ptr, at, ok, split_stride, SPLITS: tl.constexpr):
    """A program's float32 sums at offsets `at`: y itself (in its dtype) without a split, else this split's
    partials, which the last split to arrive adds up."""
    if SPLITS == 1:
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(part_ptr + tl.program_id(2) * split_stride + at, y, mask=ok)


@triton.jit
def store_rows(y, y_ptr, part_ptr, tickets_ptr, at, ok, split_stride, SPLITS: tl.constexpr):
    """A split-K program's end: its sums stored (`store_part`), and with a split, the block's total from
    the last split to arrive."""
    store_part(y, y_ptr, part_ptr, at, ok, split_stride, SPLITS)
    if SPLITS > 1:
        if last_to_arrive(tickets_ptr, SPLITS):
            sum_splits(part_ptr, y_ptr, at, ok, split_stride, SPLITS)


_TICKETS: dict[tuple[torch.device, str, Any], list[torch.Tensor]] = {}
TICKETS_MIN = 1 << 16


def arrival_tickets(device: torch.device, n: int, pool: str = "tickets") -> torch.Tensor:
    """`last_to_arrive`'s counters on a device: a buffer of at least `n`, zero between launches (each block's last
    program resets its own), so one buffer serves every call of every kernel that runs one launch after another:
    one per stream lane (`ascend.device.stream_lane`: the streamed decode's branches, which run at once, each have
    their own). Buffers are never freed: a captured graph keeps using the one it was captured with. One first needed
    inside a CUDA graph capture is not kept for eager calls: its zeroing exists only in that graph. Kept per lane for
    good, so each lane seen holds its buffers (a few per side stream on a GPU; the interpreter's CPU streams, one
    per stream object made). `pool` keeps the cooperative top-k's barrier counts ("barriers") apart from the tickets
    as well: within a lane launches run one after another, but a launch on a stream entered without
    `Device.use_stream` counts in the caller's lane, and a split-K launch moving barrier counts would be a hang
    rather than a wrong sum."""
    kept = _TICKETS.setdefault((device, pool, stream_lane()), [])
    tickets = next((t for t in kept if t.numel() >= n), None)
    if tickets is None:
        tickets = torch.zeros(max(n, TICKETS_MIN), dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            kept.append(tickets)
    return tickets


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


if INTERPRETING:    # module import: once per process
    _interpreter_index_fix()

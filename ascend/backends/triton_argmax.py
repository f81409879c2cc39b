"""Triton kernel for the greedy pick (`model.kernels.argmax`): the index of each row's largest score in one
launch.

torch.argmax reduces a row in one thread block: over V4's 129,280 float32 logits at batch 1 its kernel took ~28 us
of an H200 decode step, about as long as the step's longest weight walk; with this kernel the benchmark's batch-1
decode loop is ~53 us per token faster (docs/performance.md, fifteenth session). Here a program per chunk of a row
finds the chunk's first largest score, and the last of the row's programs to finish
(`triton_common.last_to_arrive`) picks among the chunks, so the pick is one launch with no host sync
(graph-capturable). Same index as torch.argmax: the first largest, a NaN counting as the largest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend.backends.triton_common import after_previous_kernel, arrival_tickets, last_to_arrive, launch_options

BLOCK = 1024        # scores per program: 127 programs for a V4 row, 4 KiB each


@triton.jit
def _first_largest(v, at, NONE):
    """(largest of v, lowest `at` where v has it); a NaN is the largest. NONE: an `at` that never wins."""
    nan = v != v
    any_nan = tl.max(nan.to(tl.int32), 0) > 0
    top = tl.max(tl.where(nan, float("-inf"), v), 0)
    first = tl.min(tl.where(tl.where(any_nan, nan, v == top), at, NONE), 0)
    return tl.where(any_nan, float("nan"), top), first


@triton.jit
def _argmax_kernel(x_ptr, part_v_ptr, part_i_ptr, out_ptr, tickets_ptr, V, s_row,
                   BLOCK: tl.constexpr, CHUNKS_P2: tl.constexpr, PDL: tl.constexpr):
    """Program (row, 0, chunk): the chunks of a row are its split (grid axis z), its ticket is the row's."""
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(2)
    chunks = tl.num_programs(2)
    at = chunk * BLOCK + tl.arange(0, BLOCK)
    # past V: -inf at an index above every real one, so it never wins (a row of -inf gives index 0, as argmax)
    v = tl.load(x_ptr + row * s_row + at, mask=at < V, other=float("-inf")).to(tl.float32)
    top, first = _first_largest(v, at, V)
    tl.store(part_v_ptr + row * chunks + chunk, top)
    tl.store(part_i_ptr + row * chunks + chunk, first)
    if last_to_arrive(tickets_ptr, chunks):
        c = tl.arange(0, CHUNKS_P2)
        ok = c < chunks     # the other programs' partials, read from L2 (`.cg`)
        tops = tl.load(part_v_ptr + row * chunks + c, mask=ok, other=float("-inf"), cache_modifier=".cg")
        firsts = tl.load(part_i_ptr + row * chunks + c, mask=ok, other=V, cache_modifier=".cg")
        _, best = _first_largest(tops, firsts, V)
        tl.store(out_ptr + row, best.to(tl.int64))


def argmax(scores: torch.Tensor, num_warps: int = 4) -> torch.Tensor:
    """scores [..., V] (float32 / bf16 / fp16) -> int64 [...], as `model.kernels.argmax`."""
    flat = scores.reshape(-1, scores.size(-1))
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows, width = flat.shape
    out = torch.empty(rows, dtype=torch.int64, device=scores.device)
    if rows:
        chunks = triton.cdiv(width, BLOCK)
        part_v = torch.empty(rows, chunks, dtype=torch.float32, device=scores.device)
        part_i = torch.empty(rows, chunks, dtype=torch.int32, device=scores.device)
        _argmax_kernel[(rows, 1, chunks)](flat, part_v, part_i, out, arrival_tickets(scores.device, rows), width,
                                          flat.stride(0), BLOCK=BLOCK, CHUNKS_P2=triton.next_power_of_2(chunks),
                                          num_warps=num_warps, **launch_options(scores.device))
    return out.view(scores.shape[:-1])

"""Decode-sized projections with unquantised weights: y = x W^T for a few rows (up to 64; the CUDA backend gives it
1-32), plain or grouped (each of G groups' rows of W meets that group's slice of x: attention's wo_a, which V4's
checkpoints hold in BF16).

At these sizes a projection is a read of its weight (64 MiB for V4-Flash's wo_a and wo_b in bf16) and little
arithmetic. cuBLAS read them on an H200 at 2.9-3.5 TB/s (`scripts/bench_moe.py --cases bf16`, docs/performance.md);
this kernel streams the weight through tensor-core tiles of all the rows at once: program (block of output rows,
group, input split) loads its [BLOCK_OUT, BLOCK_IN] weight tiles through a deep software pipeline (`num_stages`) and
multiplies each with the rows' [BLOCK_IN, BLOCK_M] slice; a grid that would leave SMs idle (wo_b: 4,096 outputs, 64
blocks) splits the inputs, and the last split of each block to finish adds the float32 partials in split order
(`triton_common.store_rows`, as the expert kernels' split-K end: deterministic), in the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend.backends.triton_common import (after_previous_kernel, arrival_tickets, dot_precision, launch_options,
                                           shared_memory, sm_count, store_rows)


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, y_ptr, part_ptr, tickets_ptr, M, OUT, IN, K_SPLIT, sx_m, sx_g, sw_o, sy_m, sy_g,
                   sy_split, BLOCK_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr,
                   SPLITS: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (output block, group g, split): y[:, g, block] (or this split's partial) = x[:, g, inputs of the
    split] @ W[g * OUT + block, those inputs]^T. EVEN: whole blocks everywhere, so the weight loads need no mask."""
    after_previous_kernel(PDL)
    g = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows < OUT
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    cols = tl.arange(0, BLOCK_IN)
    w_rows = w_ptr + (g * OUT + rows)[:, None].to(tl.int64) * sw_o
    x_cols = x_ptr + g * sx_g + m[None, :] * sx_m                  # [1, BLOCK_M]: the rows seen transposed
    acc = tl.zeros([BLOCK_OUT, BLOCK_M], tl.float32)
    k_first = tl.program_id(2) * K_SPLIT
    for k0 in range(k_first, tl.minimum(IN, k_first + K_SPLIT), BLOCK_IN):
        col = k0 + cols
        if EVEN:
            w = tl.load(w_rows + col[None, :])
        else:
            w = tl.load(w_rows + col[None, :], mask=row_ok[:, None] & (col < IN)[None, :], other=0.0)
        xt = tl.load(x_cols + col[:, None], mask=m_ok[None, :] & (col < IN)[:, None], other=0.0)
        acc += tl.dot(w, xt, input_precision=PRECISION)
    store_rows(acc, y_ptr, part_ptr, tickets_ptr, m[None, :] * sy_m + g * sy_g + rows[:, None],
                row_ok[:, None] & m_ok[None, :], sy_split, SPLITS)


def matmul(x: torch.Tensor, weight: torch.Tensor, block_out: int = 64, block_in: int = 128, num_warps: int = 4,
           num_stages: int = 5, splits: int | None = None) -> torch.Tensor:
    """x [M, G, IN] and weight [G * OUT, IN] (unit stride along IN) of x's dtype -> y [M, G, OUT] in x's dtype,
    y[:, g] = x[:, g] @ W[g * OUT:(g + 1) * OUT]^T (G = 1: a plain projection). M at most 64 (one tile of rows).
    `splits`: input splits per output block; None: enough that the grid has about one program per SM, each split
    at least two input blocks."""
    rows, groups, n_in = x.shape
    n_out = weight.size(0) // groups
    assert weight.shape == (groups * n_out, n_in) and weight.dtype == x.dtype and rows <= 64
    assert weight.stride(-1) == 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_m = max(16, triton.next_power_of_2(rows))
    # the pipeline's stages as the GPU's shared memory holds them (a weight and a rows tile each, with room for the
    # compiler's own): all 5 on an H100 / H200, fewer on a GPU of ~100 KiB per program
    stage_bytes = (block_out + block_m) * block_in * x.element_size()
    num_stages = max(1, min(num_stages, (shared_memory(x.device) - 16384) // stage_bytes))
    blocks = triton.cdiv(n_out, block_out) * groups
    if splits is None:
        splits = max(1, min(sm_count(x.device) // blocks, n_in // (2 * block_in)))
    k_split = triton.cdiv(triton.cdiv(n_in, splits), block_in) * block_in
    splits = triton.cdiv(n_in, k_split)
    y = torch.empty(rows, groups, n_out, device=x.device, dtype=x.dtype)
    if splits > 1:
        part = torch.empty(splits, rows, groups, n_out, device=x.device, dtype=torch.float32)
        tickets = arrival_tickets(x.device, blocks)
    else:
        part = tickets = y          # unused: a kernel without a split stores y directly
    even = n_out % block_out == 0 and n_in % block_in == 0
    _matmul_kernel[(triton.cdiv(n_out, block_out), groups, splits)](
        x, weight, y, part, tickets, rows, n_out, n_in, k_split, x.stride(0), x.stride(1), weight.stride(0),
        y.stride(0), y.stride(1), part.stride(0) if splits > 1 else 0, BLOCK_OUT=block_out,
        BLOCK_M=block_m, BLOCK_IN=block_in, SPLITS=splits, EVEN=even,
        PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages, **launch_options(x.device))
    return y

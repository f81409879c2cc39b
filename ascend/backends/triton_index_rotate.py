"""Triton kernel for the CSA indexer's rotation: RoPE, Hadamard transform and FP4 simulation in one launch.

The indexer's queries [B, S, H, D] (after their projection, `model.indexer.Indexer.project_queries`) and its keys
[B, N, D] (the new compressed entries, after their norm, `model.compressor.Compressor`) take RoPE on their last
dims, the normalised Hadamard transform and (with the quantisation simulation on) the FP4 round trip per block of 32
values.
As stages these are four to six launches on each of the two branches that a CSA decode step's selection waits for
(docs/performance.md); here one program takes BLOCK_R rows through all three, rounding to the input dtype where the
stages do:

- RoPE in float32, each member of an interleaved pair reading its partner by index (`kernels.rope`'s products and
  sums, compiled without fused multiply-adds, so each rounds as it does there);
- the Hadamard transform as one tensor-core product with the +-1 matrix (exact products, float32 sums in the
  MMA's order, then the D^-0.5 scale), as `cuda.hadamard_matmul`;
- the FP4 round trip of `model.quant.fp4_round_trip`: each block's amax (floored at 6 * 2^-126) times 1/6, its
  power-of-two ceiling built from the float's bits (`quant.pow2_scale`), the e2m1 grid's rounding half to even at
  its step (0.5, 1, 2), the sign kept (-0 too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend.backends.triton_common import after_previous_kernel, dot_precision, launch_options

BLOCK_R = 16            # rows (token x head) per program: the MMA's smallest M; 32 programs at V4-Flash batch 8
MAX_DIM = 256           # the D x D Hadamard tile and the rows are held in registers (V4's indexer: D = 128)
FP4_MAX = tl.constexpr(6.0)
ROUND = tl.constexpr(12582912.0)    # 1.5 * 2^23: t + ROUND - ROUND is t rounded half to even, for 0 <= t < 2^22


@triton.jit
def _index_rotate_kernel(x_ptr, cos_ptr, sin_ptr, h_ptr, out_ptr, rows, heads,
                        D: tl.constexpr, ROPE: tl.constexpr, FP4_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                        PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Rows r of x [rows, D] (row r of token r // heads); cos, sin [tokens, ROPE / 2] float32; h the +-1 Hadamard
    matrix [D, D] in any float dtype. FP4_BLOCK 0: no FP4 simulation."""
    after_previous_kernel(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    ok = (r < rows)[:, None]
    at = r.to(tl.int64)[:, None] * D
    x = tl.load(x_ptr + at + d[None, :], mask=ok, other=0.0)
    partner = tl.load(x_ptr + at + (d ^ 1)[None, :], mask=ok, other=0.0).to(tl.float32)

    # RoPE: 2k -> x0 c - x1 s, 2k + 1 -> x1 c + x0 s (the sine signed per member); the leading dims pass through
    rotated = (d >= D - ROPE)[None, :]
    pair = (r // heads).to(tl.int64)[:, None] * (ROPE // 2) + tl.maximum(d - (D - ROPE), 0)[None, :] // 2
    c = tl.load(cos_ptr + pair, mask=ok & rotated, other=1.0)
    s = tl.load(sin_ptr + pair, mask=ok & rotated, other=0.0)
    s = tl.where((d % 2 == 1)[None, :], s, s * -1.0)       # times -1, not 0 - s: -0 for +0, as the reference
    xf = x.to(tl.float32)
    y = tl.where(rotated, xf * c + partner * s, xf).to(x.dtype)

    h = tl.load(h_ptr + d[:, None] * D + d[None, :]).to(x.dtype)      # +-1: exact in any dtype
    z = (tl.dot(y, h, input_precision=PRECISION) * (D ** -0.5)).to(x.dtype)

    if FP4_BLOCK:
        blocks = tl.reshape(z.to(tl.float32), [BLOCK_R * D // FP4_BLOCK, FP4_BLOCK])
        amax = tl.maximum(tl.max(tl.abs(blocks), axis=1), FP4_MAX * 2.0 ** -126)
        bits = (amax * (1.0 / FP4_MAX)).to(tl.int32, bitcast=True)
        e = tl.minimum(((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32), 127)
        scale = ((e + 127) << 23).to(tl.float32, bitcast=True)[:, None]
        v = tl.math.div_rn(blocks, scale)
        a = tl.minimum(tl.abs(v), FP4_MAX, propagate_nan=tl.PropagateNan.ALL)
        step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
        grid = ((a * (1.0 / step) + ROUND) - ROUND) * step * scale
        negative = v.to(tl.int32, bitcast=True) < 0                      # -0 too
        z = tl.reshape(tl.where(negative, grid * -1.0, grid), [BLOCK_R, D]).to(x.dtype)
    tl.store(out_ptr + at + d[None, :], z, mask=ok)


def index_rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hadamard: torch.Tensor,
                fp4_block: int) -> torch.Tensor:
    """q [B, S, H, D] (D a power of two, 16 to MAX_DIM), cos / sin [B, S, R / 2] float32 with R <= D (one row of
    angles per token: the kernel indexes them by token, it does not broadcast), hadamard the +-1 matrix [D, D] (any
    float dtype: the kernel converts it); fp4_block 0 for no FP4 simulation, else a power of two dividing D -> [B, S, H, D] in q's dtype."""
    check_shapes(q, cos, sin, fp4_block)
    b, s, heads, d = q.shape
    q, rows = q.contiguous(), b * s * heads
    out = torch.empty_like(q)
    _index_rotate_kernel[(triton.cdiv(rows, BLOCK_R),)](
        q, cos.float().contiguous(), sin.float().contiguous(), hadamard.contiguous(), out, rows, heads,
        D=d, ROPE=2 * cos.size(-1), FP4_BLOCK=fp4_block, BLOCK_R=BLOCK_R, PRECISION=dot_precision(q.dtype),
        num_warps=4, enable_fp_fusion=False, **launch_options(q.device))
    return out


def check_shapes(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp4_block: int) -> None:
    """ValueError naming what `index_rotate` cannot take (the kernel would read past the angles or mix blocks)."""
    if q.dim() != 4:
        raise ValueError(f"index_rotate: q must be [B, S, H, D], got shape {tuple(q.shape)}")
    d = q.size(-1)
    if d & (d - 1) or not 16 <= d <= MAX_DIM:
        raise ValueError(f"index_rotate: head dim {d} must be a power of two from 16 to {MAX_DIM}")
    want = (*q.shape[:2], cos.size(-1))
    if tuple(cos.shape) != want or tuple(sin.shape) != want or 2 * cos.size(-1) > d:
        raise ValueError(f"index_rotate: cos / sin must be [B, S, R/2] = {want} with R <= {d}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    if fp4_block and (fp4_block & (fp4_block - 1) or d % fp4_block):
        raise ValueError(f"index_rotate: FP4 block {fp4_block} must be a power of two dividing the head dim {d}")

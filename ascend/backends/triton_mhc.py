"""Triton kernels for mHC (manifold-constrained hyper-connections): `hc_pre`, `hc_post` and `hc_head` in 2, 1 and 2
launches instead of the reference's 140, 6 and 15 PyTorch operators on bf16 streams (contracts: `model.kernels`).

A batch-1 decode step of V4 runs hc_pre / hc_post twice per layer; the reference's Sinkhorn alone is ~120 operators
on a 4 x 4 matrix per token, so the step is launch-bound, not bandwidth-bound. The split chosen here:

1. `_hc_partials_kernel`, grid (blocks of BLOCK_T tokens, n * D blocks): each program multiplies one block of one stream (read in
   its own dtype, no float32 copy) with the matching columns of `fn` (all (2 + n) * n rows) and also sums the
   block's squares, writing (2 + n) * n + 1 float32 partial sums. This is the mixes' GEMV split over K: at batch 1
   and V4-Flash shapes (fn 24 x 16384 float32, 1.5 MiB) that is 128 programs, enough to spread the read of `fn`
   over the SMs, as cuBLAS would, and the products stay exact float32 (`F.linear` would silently become TF32
   under `torch.set_float32_matmul_precision("high")`, moving the mixes by ~1e-3).
2. `_hc_mix_kernel`, grid (tokens, D blocks): each program adds up its token's partials (a few KiB from L2), forms
   the normaliser rsqrt(mean(x^2) + eps), the sigmoids and the Sinkhorn iterations in registers, then writes
   y = sum_k pre_k x_k for its block of D; the program of block 0 also writes post and comb. Every program of a
   token redoes the tiny Sinkhorn (identically) rather than waiting for one that did: a third launch, or a grid
   barrier, costs more than 16 elements of arithmetic. `hc_head` is the same kernel without Sinkhorn.

`hc_post` is one kernel, grid (tokens, D blocks): out_j = post_j y + sum_k comb[k, j] X_k in float32.

Numerics: float32 throughout, the reference's order of operations (softmax rows + eps, divide columns, then
`iters - 1` rounds of rows then columns), IEEE division and square root (`div_rn`, `sqrt_rn`) except in those
`iters - 1` rounds, which divide with Triton's `/` (`div.full.f32`, within 2 ulps). There IEEE division's
slow-path check made each thread's four divisions run one after another, ~0.26 us per round on an H200: 19 rounds
took 5.0 of an 11.1 us hc_pre, 1.75 us with `/` (docs/performance.md); each round renormalises, so the ulps do not
pile up. What differs from the reference is only float32 rounding: that division, the order in which
the GEMV's and the mean's sums are accumulated, `exp` and fused multiply-adds, so results agree with it to a few
float32 ulps (tests/ascend/backends/test_triton_mhc.py).

The launches depend only on tensor shapes and never read tensor values on the host, so they can be captured in a
CUDA graph; the public functions are `torch.library` custom ops (`ascend_cuda::hc_pre`, ...) with fake
implementations, so torch.compile keeps each one as a single opaque node.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (importing triton_common also applies its fix to Triton 3.6's CPU interpreter)
from ascend.backends.triton_common import after_previous_kernel, launch_options

Tensor = torch.Tensor

# Launch settings (`scripts/bench_mhc.py --variants` on an H200: within 6% of the fastest of its variants at 1, 8 and
# 32 tokens, docs/performance.md): 128-wide K blocks give 128 GEMV programs at V4-Flash batch 1, and each program
# reuses its fn block for up to 8 tokens (at batch 32 fn is read 4 times from L2, not 32); the mix kernel adds the
# partials up 64 rows at a time (80 registers per thread at any D), its Sinkhorn is ~40 dependent reductions of a
# 4 x 4 tile, which one warp does with shuffles only, and a 512-wide block of D keeps that warp's y loads at 64
# values per thread.
PRE_CONFIG = dict(block_k=128, block_t=8, kb_chunk=64, block_d=512, mix_warps=1)
POST_CONFIG = dict(block_d=128, num_warps=4)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _hc_partials_kernel(
    x_ptr, fn_ptr, part_ptr,
    T, D, M, sx_t, sx_k, sx_d, sf_m, sf_c,
    M_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr,
):
    """part[t, kb, :M] = fn[:, block kb] . x[t, block kb]; part[t, kb, M] = sum(x[t, block kb]^2), for BLOCK_T
    tokens t, which share one load of the fn block."""
    after_previous_kernel(PDL)
    kb = tl.program_id(1)
    n_db = tl.cdiv(D, BLOCK_K)
    k = kb // n_db
    d = (kb % n_db) * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = d < D
    rows = tl.arange(0, M_PAD)
    row_ok = rows < M
    w = tl.load(fn_ptr + rows[:, None] * sf_m + (k * D + d)[None, :].to(tl.int64) * sf_c,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    for tt in range(BLOCK_T):
        t = (tl.program_id(0) * BLOCK_T + tt).to(tl.int64)
        x = tl.load(x_ptr + t * sx_t + k * sx_k + d * sx_d, mask=d_ok & (t < T), other=0.0).to(tl.float32)
        out = part_ptr + (t * tl.num_programs(1) + kb) * (M + 1)
        tl.store(out + rows, tl.sum(w * x[None, :], axis=1), mask=row_ok & (t < T))
        tl.store(out + M, tl.sum(x * x, axis=0), mask=t < T)


@triton.jit
def _sigmoid(z):
    return tl.math.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp(-z))


@triton.jit
def _hc_mix_kernel(
    x_ptr, part_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
    D, KB, iters, eps, norm_eps,
    sx_t, sx_k, sx_d,
    N: tl.constexpr, N_PAD: tl.constexpr, KB_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, SINKHORN: tl.constexpr,
    PDL: tl.constexpr,
):
    """Sum the partials of token t, normalise, sigmoid (+ Sinkhorn), y[t, block] = sum_k pre_k x[t, k, block]."""
    after_previous_kernel(PDL)
    M: tl.constexpr = (2 + N) * N if SINKHORN else N
    t = tl.program_id(0)
    db = tl.program_id(1)
    i = tl.arange(0, N_PAD)
    i_ok = i < N
    cell = 2 * N + i[:, None] * N + i[None, :]                                    # comb[k, j], row-major
    ok = i_ok[:, None] & i_ok[None, :]
    # the partials' rows KB_CHUNK at a time (registers stay bounded for any D)
    kb = tl.arange(0, KB_CHUNK)
    sumsq = 0.0
    pre = tl.zeros([N_PAD], tl.float32)
    post = tl.zeros([N_PAD], tl.float32)
    z = tl.zeros([N_PAD, N_PAD], tl.float32)
    for k0 in range(0, KB, KB_CHUNK):
        kb_ok = k0 + kb < KB
        row = part_ptr + (t.to(tl.int64) * KB + k0 + kb) * (M + 1)                  # [KB_CHUNK] row starts
        sumsq += tl.sum(tl.load(row + M, mask=kb_ok, other=0.0), axis=0)
        pre += tl.sum(tl.load(row[:, None] + i[None, :], mask=kb_ok[:, None] & i_ok[None, :], other=0.0), axis=0)
        if SINKHORN:
            post += tl.sum(tl.load(row[:, None] + N + i[None, :], mask=kb_ok[:, None] & i_ok[None, :], other=0.0),
                           axis=0)
            z += tl.sum(tl.load(row[:, None, None] + cell[None], mask=kb_ok[:, None, None] & ok[None], other=0.0),
                        axis=0)

    mean = tl.math.div_rn(sumsq, (N * D).to(tl.float32))
    rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + norm_eps))                  # rsqrt, IEEE-rounded
    pre = _sigmoid(pre * rms * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=i_ok, other=0.0)) + eps

    if SINKHORN:
        post = 2.0 * _sigmoid(post * rms * tl.load(scale_ptr + 1) + tl.load(base_ptr + N + i, mask=i_ok, other=0.0))
        z = z * rms * tl.load(scale_ptr + 2) + tl.load(base_ptr + cell, mask=ok, other=0.0)
        # round 1: softmax over each row, + eps, then divide the columns by their sums (+ eps). Padding columns
        # (n not a power of two) are -inf for the softmax; padding rows stay finite, then everything padded is 0.
        z = tl.where(i_ok[None, :], z, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        comb = tl.where(ok, tl.math.div_rn(e, tl.sum(e, axis=1)[:, None]) + eps, 0.0)
        comb = tl.math.div_rn(comb, tl.sum(comb, axis=0)[None, :] + eps)
        for _ in range(iters - 1):      # Triton's division here, not div_rn: see Numerics in the module doc
            comb = comb / (tl.sum(comb, axis=1)[:, None] + eps)
            comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
        if db == 0:
            tl.store(post_ptr + t.to(tl.int64) * N + i, post, mask=i_ok)
            tl.store(comb_ptr + t.to(tl.int64) * N * N + i[:, None] * N + i[None, :], comb, mask=ok)

    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    x = tl.load(x_ptr + t.to(tl.int64) * sx_t + i[:, None] * sx_k + d[None, :] * sx_d,
                mask=i_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    y = tl.sum(pre[:, None] * x, axis=0)
    tl.store(y_ptr + t.to(tl.int64) * D + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _hc_post_kernel(
    y_ptr, res_ptr, post_ptr, comb_ptr, out_ptr,
    D, sy_t, sy_d, sr_t, sr_k, sr_d, sp_t, sp_j, sc_t, sc_k, sc_j,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """out[t, j, block] = post[t, j] y[t, block] + sum_k comb[t, k, j] res[t, k, block], float32 math."""
    after_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    i = tl.arange(0, N_PAD)
    i_ok = i < N
    ok = i_ok[:, None] & i_ok[None, :]
    y = tl.load(y_ptr + t * sy_t + d * sy_d, mask=d_ok, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + t * sr_t + i[:, None] * sr_k + d[None, :] * sr_d,
                  mask=i_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)             # [k, D]
    post = tl.load(post_ptr + t * sp_t + i * sp_j, mask=i_ok, other=0.0).to(tl.float32)     # [j]
    comb = tl.load(comb_ptr + t * sc_t + i[:, None] * sc_k + i[None, :] * sc_j, mask=ok,
                   other=0.0).to(tl.float32)                                               # [k, j]
    mixed = tl.sum(comb[:, :, None] * res[:, None, :], axis=0)                             # [j, D]
    out = post[:, None] * y[None, :] + mixed
    tl.store(out_ptr + t * N * D + i[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers
def _reduce_streams(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, norm_eps: float,
                    sinkhorn: bool, block_k: int, block_t: int, kb_chunk: int, block_d: int,
                    mix_warps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The two launches shared by hc_pre (`sinkhorn=True`) and hc_head: returns y, post, comb (the last two
    [.., 0]-sized for hc_head)."""
    *lead, n, D = x.shape
    m = (2 + n) * n if sinkhorn else n
    if fn.shape != (m, n * D):
        raise ValueError(f"hc fn: expected shape ({m}, {n * D}) for x {tuple(x.shape)}, got {tuple(fn.shape)}")
    xt = x.reshape(-1, n, D)
    T = xt.size(0)
    y = x.new_empty(*lead, D)
    post = x.new_empty(*lead, n if sinkhorn else 0, dtype=torch.float32)
    comb = x.new_empty(*lead, n if sinkhorn else 0, n, dtype=torch.float32)
    if T == 0:
        return y, post, comb
    kb = n * triton.cdiv(D, block_k)
    part = torch.empty(T, kb, m + 1, dtype=torch.float32, device=x.device)
    block_t = min(block_t, triton.next_power_of_2(T))
    _hc_partials_kernel[(triton.cdiv(T, block_t), kb)](xt, fn, part, T, D, m, *xt.stride(), *fn.stride(),
                                                       M_PAD=triton.next_power_of_2(m), BLOCK_K=block_k,
                                                       BLOCK_T=block_t, **launch_options(x.device))
    _hc_mix_kernel[(T, triton.cdiv(D, block_d))](
        xt, part, scale, base, y, post, comb, D, kb, iters, eps, norm_eps, *xt.stride(),
        N=n, N_PAD=triton.next_power_of_2(n), KB_CHUNK=min(kb_chunk, triton.next_power_of_2(kb)), BLOCK_D=block_d,
        SINKHORN=sinkhorn, num_warps=mix_warps, **launch_options(x.device))
    return y, post, comb


def launch_hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, norm_eps: float,
                  **launch: int) -> tuple[Tensor, Tensor, Tensor]:
    """`model.kernels.hc_pre` in two launches; `launch` overrides PRE_CONFIG's settings (benchmarks, tests)."""
    return _reduce_streams(x, fn, scale.float().contiguous(), base.float().contiguous(), iters, eps, norm_eps,
                           True, **{**PRE_CONFIG, **launch})


def launch_hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float,
                   **launch: int) -> Tensor:
    """`model.kernels.hc_head` in two launches (hc_pre's kernels without Sinkhorn); `launch` as for hc_pre."""
    return _reduce_streams(x, fn, scale.float().contiguous(), base.float().contiguous(), 1, eps, norm_eps,
                           False, **{**PRE_CONFIG, **launch})[0]


def launch_hc_post(y: Tensor, residual: Tensor, post: Tensor, comb: Tensor, **launch: int) -> Tensor:
    """`model.kernels.hc_post` in one launch; `launch` overrides POST_CONFIG's settings."""
    launch = {**POST_CONFIG, **launch}
    *lead, n, D = residual.shape
    yt, rt = y.reshape(-1, D), residual.reshape(-1, n, D)
    pt, ct = post.reshape(-1, n), comb.reshape(-1, n, n)
    out = y.new_empty(*lead, n, D)
    if yt.size(0):
        _hc_post_kernel[(yt.size(0), triton.cdiv(D, launch["block_d"]))](
            yt, rt, pt, ct, out, D, *yt.stride(), *rt.stride(), *pt.stride(), *ct.stride(),
            N=n, N_PAD=triton.next_power_of_2(n), BLOCK_D=launch["block_d"], num_warps=launch["num_warps"],
            **launch_options(y.device))
    return out


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("ascend_cuda::hc_pre", mutates_args=())
def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Triton `model.kernels.hc_pre`: y in x's dtype, post and comb float32."""
    return launch_hc_pre(x, fn, scale, base, iters, eps, norm_eps)


@hc_pre.register_fake
def _(x, fn, scale, base, iters, eps, norm_eps):
    *lead, n, D = x.shape
    return (x.new_empty(*lead, D), x.new_empty(*lead, n, dtype=torch.float32),
            x.new_empty(*lead, n, n, dtype=torch.float32))


@torch.library.custom_op("ascend_cuda::hc_post", mutates_args=())
def hc_post(y: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """Triton `model.kernels.hc_post`: [.., n, D] in y's dtype."""
    return launch_hc_post(y, residual, post, comb)


@hc_post.register_fake
def _(y, residual, post, comb):
    return y.new_empty(residual.shape)


@torch.library.custom_op("ascend_cuda::hc_head", mutates_args=())
def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float) -> Tensor:
    """Triton `model.kernels.hc_head`: [.., D] in x's dtype."""
    return launch_hc_head(x, fn, scale, base, eps, norm_eps)


@hc_head.register_fake
def _(x, fn, scale, base, eps, norm_eps):
    return x.new_empty(*x.shape[:-2], x.shape[-1])

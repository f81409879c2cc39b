"""CUDA backend: `Kernels` with fused versions of the hot decode stages of V4.

The attention stages, the quantised matmuls and mHC have a Triton implementation each, static-shaped and free of
host syncs (CUDA-graph capturable), and a PyTorch fallback:

| stage                    | Triton (CUDA + Triton present)                     | PyTorch (any device, CPU tests)      |
|--------------------------|----------------------------------------------------|--------------------------------------|
| `sparse_attn`            | gather-and-attend over the index list, split-K     | gather rows, one SDPA call, sink key |
| `indexer_topk`           | fused relu-weighted scores, radix-select top-k     | two batched matmuls, the reference's |
|                          | (long rows chunked; decode's to 128K one launch)   | top-k (ties to the lowest indices)   |
| `expert_matmul`          | fp4 / fp8 bytes decoded in registers (triton_moe)  | the reference                        |
| `group_experts`          | one sort per MoE layer for its expert matmuls      | the reference (None)                 |
| `linear, grouped_linear` | the same kernels, decode-sized fp8 / fp4 inputs;   | the reference                        |
|                          | one-row bf16 `linear`: the float32 walk, rounded;  |                                      |
|                          | other bf16 of 1-32 rows: tensor-core tiles, split  |                                      |
|                          | inputs summed in the launch (triton_linear)        |                                      |
| `f32_linear` (one row)   | the same walk over bf16 weights, float32 out       | cuBLAS, bf16 in, float32 out         |
| `hc_pre/hc_post/hc_head` | GEMV partials + Sinkhorn in registers (triton_mhc) | the reference                        |
| `gate_topk` (scored)     | scores, k argmax rounds, weights in one launch     | the reference                        |
| `argmax` (greedy pick)   | a program per chunk of a row, one launch           | the reference (torch.argmax)         |
| `compress_blocks`        | decode: the token written in place, its block      | the reference (staging buffer)       |
|                          | pooled only when complete (triton_compressor)      |                                      |
| `index_rotate` (optional)| the CSA indexer's RoPE, Hadamard and FP4 of its    | none (the three stages in turn)      |
|                          | queries and keys, one launch (triton_index_rotate) |                                      |
| `indexer_scores`,        | `indexer_topk`'s two kernels, which a decode       | its batched-matmul scores and the    |
| `select_topk` (optional) | schedule runs apart (ascend.backends.streams)      | reference's selection                |

The PyTorch versions are what the Triton ones are tested against on the GPU, and what the CPU
tests compare with `model.kernels.REFERENCE`.

`rms_norm`, `rope` and `hadamard` get shorter PyTorch formulations too (fused `F.rms_norm`, one complex
multiply, one matmul with a cached Hadamard matrix): the same math in a third to a tenth of the kernel
launches, which is what a small-batch decode step is made of. `f32_linear` (router, compressors, head) multiplies
the bf16 weights directly into float32 instead of widening them on every call.

`compile_decode(step)` goes further: `torch.compile` (inductor, one static graph) of a whole decode step built
on `make_kernels(for_compile=True)`, which fuses the hundreds of small ops of prolog, compressor, indexer and
epilog (norms, RoPE, FP8 / FP4 simulations, staging, cache writes) into a few dozen generated kernels; the
Triton stages enter the graph as opaque custom ops. Its table's `fp4_round_trip` (the indexer's FP4 simulation
without Triton: with Triton its queries and keys take `index_rotate`, one custom op) is
`quant.fp4_round_trip_float`, the same values in float arithmetic, which inductor fuses (the cast form's code
tables, bucketize and ue8m0 cast stayed six unfused launches per call); uncompiled that form is more launches
than the cast one (49 ATen ops against 42, an ad-hoc CPU count), so the eager table keeps the cast form. Capture the compiled step in a
graph as usual.

On sm_90+ every Triton kernel, the backend's and inductor's, is launched with programmatic dependent launch
(`triton_common.PDL`, INDUCTOR_CONFIG): in a captured step each kernel's programs are scheduled while the previous
kernel drains and wait for its results on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import quant
from model.kernels import REFERENCE, Kernels, select_topk, sum_scores


def sparse_attn_sdpa(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Sparse attention as one SDPA call over the gathered rows.

    The sink is folded in as one extra key: a zero vector (so q.k = 0 and its value adds nothing)
    whose additive mask entry is sink[h]; its softmax weight is then exp(sink) / denominator, which
    is exactly "exp(sink) in the denominator only". Invalid (-1) slots get -inf; the sink column is
    always finite, so a row with no valid slot yields zeros instead of NaN.
    """
    B, S, H, D = q.shape
    K = indices.shape[-1]
    valid = indices >= 0
    rows = indices.clamp(min=0).long()
    batch = torch.arange(B, device=kv.device).view(B, 1, 1)
    keys = kv[batch, rows].to(q.dtype)                                            # [B,S,K,D]
    keys = torch.cat([keys, keys.new_zeros(B, S, 1, D)], dim=2).view(B * S, 1, K + 1, D)
    # one KV head shared by all heads: the heads become the query rows of a single-head attention
    mask = torch.zeros(B, S, H, K + 1, device=q.device, dtype=q.dtype)
    mask[..., :K].masked_fill_(~valid.unsqueeze(2), float("-inf"))
    mask[..., K] = sink.to(q.dtype)
    out = F.scaled_dot_product_attention(q.reshape(B * S, 1, H, D), keys, keys,
                                         attn_mask=mask.view(B * S, 1, H, K + 1), scale=scale)
    return out.view(B, S, H, D)


def indexer_scores_bmm(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                       n_visible: torch.Tensor) -> torch.Tensor:
    """score[b,s,t] = sum_h w[b,s,h] * relu(q[b,s,h].k[b,t]) as two batched matmuls, fp32, -inf if t >= n_visible."""
    B, S, H, D = q.shape
    T = k.shape[1]
    logits = torch.bmm(q.reshape(B, S * H, D).float(), k.float().transpose(1, 2)).relu_()   # [B, S*H, T]
    scores = torch.bmm(weights.reshape(B * S, 1, H).float(), logits.view(B * S, H, T)).view(B, S, T)
    visible = torch.arange(T, device=q.device).view(1, 1, T) < n_visible.unsqueeze(-1)
    return scores.masked_fill(~visible, float("-inf"))


def indexer_topk_bmm(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, n_visible: torch.Tensor,
                     topk: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Lightning-indexer selection in plain PyTorch: int32 [B,S,topk], -1 padded."""
    return select_topk(sum_scores(indexer_scores_bmm(q, k, weights, n_visible), group), topk)


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`kernels.rms_norm` through torch's fused RMS norm (float32 math, x's dtype out)."""
    w = weight.float() if weight is not None else None
    return F.rms_norm(x.float(), (x.size(-1),), w, eps).to(x.dtype)


def f32_linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`kernels.f32_linear`: bf16 operands straight into one float32-accumulating, float32-output GEMM (`mm` with
    `out_dtype`, CUDA only) instead of a float32 copy of the weight per call; other dtypes take the reference."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not x.is_cuda:
        return REFERENCE.f32_linear(x, weight)
    y = torch.mm(x.reshape(-1, x.size(-1)), weight.t(), out_dtype=torch.float32)
    return y.view(*x.shape[:-1], weight.size(0))


@torch.library.custom_op("ascend_cuda::f32_gemv", mutates_args=())
def f32_gemv_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton `kernels.f32_linear` of one row, float32 [1, out] (`triton_moe.f32_gemv`; `f32_gemv_applies`)."""
    from ascend.backends import triton_moe
    return triton_moe.f32_gemv(x, weight, **F32_GEMV_CONFIG)


@f32_gemv_triton.register_fake
def _(x, weight):
    return x.new_empty(x.size(0), weight.size(0), dtype=torch.float32)


# The Triton walk for `f32_linear` at one row (batch-1 decode) up to this many outputs: V4's routers (256 experts
# on Flash) and compressors (wkv and wgate as one joint call, at most 2 x 2 x 512). scripts/bench_moe.py's bf16
# cases on an H200 at 4096 inputs, weights cold in L2: the router 4.9 us against cuBLAS's 6.8, a compressor's wkv
# (1024) 5.9 against 7.7, its joint wkv + wgate (2048) 7.7 against 9.5, but the head (129,280 outputs, where
# cuBLAS reads at bandwidth) 264 against 244 (docs/performance.md). Shapes between were not measured.
F32_GEMV_MAX_OUT = 2048


def f32_gemv_applies(rows: int, n_out: int) -> bool:
    """Whether `f32_linear_triton` takes the Triton walk for this shape (else cuBLAS)."""
    return rows == 1 and n_out <= F32_GEMV_MAX_OUT


def _walk_one_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x W^T in float32 by the Triton walk when x is one bf16 row and the bf16 weight has few outputs
    (`f32_gemv_applies`), else None (the caller's other path)."""
    rows = x.numel() // x.size(-1)
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not f32_gemv_applies(rows, weight.size(0)):
        return None
    return f32_gemv_triton(x.reshape(1, x.size(-1)), weight).view(*x.shape[:-1], weight.size(0))


def f32_linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`kernels.f32_linear` with the Triton kernels: one row of bf16 x and weight with few outputs is one launch of
    the per-selection walk (its input split added up inside), where cuBLAS's GEMM at one row splits K and adds the
    parts in a second launch; other shapes and dtypes as `f32_linear_bf16`."""
    y = _walk_one_row(x, weight)
    return f32_linear_bf16(x, weight) if y is None else y


def rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`kernels.rope` as one complex multiply of the (even, odd) pairs of the last 2 * cos.size(-1) dims."""
    r = 2 * cos.size(-1)
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    turn = torch.complex(cos.float(), -sin.float() if inverse else sin.float())
    pairs = torch.view_as_complex(x[..., -r:].float().unflatten(-1, (-1, 2)).contiguous())
    rotated = torch.view_as_real(pairs * turn).flatten(-2)
    return torch.cat((x[..., :-r], rotated.to(x.dtype)), dim=-1)


def rope_pointwise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`kernels.rope` as one pointwise map over all of x's dims, for inductor: element 2k of a pair becomes x0 * c -
    x1 * s and element 2k + 1 x1 * c + x0 * s (the reference's products and sums, each pair member reading its
    partner by index), the leading dims pass through a where. The reference's slices, stack and cat split the q
    path's norm and RoPE into three kernels in the compiled decode step; a pointwise map fuses with the norm before
    it."""
    d, r = x.size(-1), 2 * cos.size(-1)
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if inverse:
        sin = -sin
    dims = torch.arange(d, device=x.device)
    pair = ((dims - (d - r)) // 2).clamp(min=0)                     # each rotated dim's pair; 0 for the rest
    c, s = cos[..., pair], sin[..., pair]
    s = torch.where(dims % 2 == 1, s, -s)
    y = x.float()
    partner = y.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)        # x[2k + 1] at 2k, x[2k] at 2k + 1
    return torch.where(dims >= d - r, y * c + partner * s, y).to(x.dtype)


_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _hadamard_matrix(d: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H_d * d^-0.5 in float32, or the unscaled +-1 matrix H_d in bfloat16 (exact), built once per (d, device, dtype)
    from the reference transform of the identity (row i is the transform of unit vector i; it raises for a d that is
    not a power of two). A dict rather than `lru_cache` so that a compiled graph reads the filled entry as a tensor
    (eager warm-up runs fill it before compilation and capture) instead of re-tracing and re-running the
    construction on every call."""
    h = _HADAMARD.get((d, device, dtype))
    if h is None:
        h = REFERENCE.hadamard(torch.eye(d, device=device))
        if dtype == torch.bfloat16:
            h = (h * d ** 0.5).round().to(dtype)
        _HADAMARD[d, device, dtype] = h
    return h


def hadamard_matmul(x: torch.Tensor) -> torch.Tensor:
    """`kernels.hadamard` as one matmul with the (symmetric) Hadamard matrix. BF16 on CUDA: x times the +-1 matrix
    on the tensor cores with float32 accumulation and output, then the d^-0.5 scale: every product is exact, so
    this is the reference's butterfly (float32 sums of +-x, then the scale) summed in another order. It also avoids
    a slow cuBLAS kernel: for the 16 rows of the indexer's new entries at batch 8, 11 us on an H200 where the
    float32 matmul with the scaled matrix took 60-62 us (scripts/bench_attention.py's kernel table,
    docs/performance.md). Otherwise one float32 matmul with H_d * d^-0.5 (exact to float32 rounding under torch's
    default matmul precision; TF32 would not be)."""
    d = x.size(-1)
    if x.dtype == torch.bfloat16 and x.is_cuda:
        y = torch.mm(x.reshape(-1, d), _hadamard_matrix(d, x.device, x.dtype), out_dtype=torch.float32)
        return (y * d ** -0.5).view(x.shape).to(x.dtype)
    return (x.float() @ _hadamard_matrix(d, x.device)).to(x.dtype)


# Launch settings of the Triton kernels: the fastest of the alternatives scripts/bench_attention.py times, on an
# H200 at V4-Flash decode shapes (docs/performance.md): 16 heads per program with 4 warps beat 32 heads with 8 by
# up to 1.8x at batch 32 (fewer registers, more programs in flight).
# The indexer's decode queries take their keys in parts of several tiles, the next tiles' keys loaded while one is
# scored (3 stages), as many parts as keep the grid within 2 programs per SM: one round. On the H200 (session 24's
# jobs 3-5, docs/performance.md) alone 8 queries x 32,768 keys 24.9 against 30.9 us with a program per tile; in the
# CSA decode step per token at 128K / 1M context 6.9 / 58.6 us faster at batch 8 and, at 4 per SM, 24.5 / 131 at
# batch 32 (job 4), where 2 per SM took 4.1-4.8 / 4.3-4.7 more off (job 5). With the keys as the product's rows
# (session 27) a decode part's tile is 64 keys, one warpgroup's product: in the CSA step per token (job 2, wq_b
# after the scores) batch 8 / 32 at 8K 124.9 / 145.6 us against 123.2 / 146.9 with 128-key tiles (the faster of 4
# warps at 2 per SM and 8 warps at 4; batch 8's parts were single tiles, see the end), at 128K 160.3 / 248.3
# against 168.7 / 259.4, where alone 128 keys had led (8 x 32,768: 19.9 against 21.2-22.0, heads as rows 25.0; job
# 1); 4 programs per SM were faster only at batch 8 and 128K (157.4 against 159.6, job 4), 13-79 us slower at batch
# 32 at 128K and 1M and at batch 8 at 1M. Prefill's program per tile takes 128 keys: alone, one sequence's 4,096 /
# 16,384 queries over 32,768 keys 8.4 / 33.7 ms against 11.4 / 46.9 at 64 and 10.4 / 43.2 with heads as rows (job
# 4); so does a decode query whose parts would be single tiles (CSA batch 8 at 8K: 122.6 against 124.0 us per
# token, job 6).
SPARSE_ATTN_CONFIG = dict(block_h=16, block_k=32, num_warps=4, waves=2.0)
INDEXER_CONFIG = dict(block_t=64, tile_block_t=128, num_warps=4, per_sm=2, num_stages=3)
# Decode at batch 8 or more (up to a quarter of the SMs) with lists short of the long-list rule below (CSA at batch
# 8, HCA at 8K): the same 16 heads with 64 keys per step and one round of programs. In the streamed decode step at
# 8K on the H200 (one job, two captures each, docs/performance.md) HCA batch 8 / 32 103.4 / 130.4 us against 105.5
# / 134.7, CSA batch 8 within the captures' spread (147.7 against 148.3). Not measured at batch 1 (where it halves
# the chunks, 20 to 10 at V4's CSA lists) nor in prefill, which keep SPARSE_ATTN_CONFIG; its tiles (queries and two
# stages of 64 keys: 144 KiB at 512 bf16 dims) must fit the shared memory, as the long-list setting's must.
SPARSE_ATTN_BATCH_CONFIG = SPARSE_ATTN_CONFIG | dict(block_k=64, waves=1.0)
# Long index lists at decode (HCA's from 128K context on, CSA's 640 at batch 32): 64 heads per program, so that each
# KV tile is read once for all of them and Hopper's warpgroup MMA has its 64 rows, 64 keys per step, 8 warps. It takes
# more than half an SM's shared memory (192 KiB compiled for sm_90 at V4's 512 dims), so one program
# per SM, and the list is split into one round of programs (waves 1). Alone on an H200 at V4-Flash shapes, us against
# the 16-head setting of 32 keys (one job, docs/performance.md): HCA batch 32 at 1M context 164 against 345, batch 8
# at 1M 67 against 102, batch 32 at 128K 43 against 60, batch 8 at 128K (9K rows in all) 21 against 23, CSA batch 32
# at 8K 31 against 36; but CSA batch 8 at 8K (5K rows) 18.5 against 17.9. So `sparse_attn_config` takes it for decode
# steps of SPARSE_ATTN_LONG_ROWS queries x entries or more, at the batches measured (8 to 32 on 132 SMs: from 8 to a
# quarter of the SMs), on GPUs whose shared memory holds a conservative estimate of its tiles (the queries and the
# launch's two pipeline stages of keys, at D rounded up to a power of two: 192 KiB at 512 bf16 dims, as compiled;
# so H100 / H200 and not the 99 KiB of sm_86 / sm_89 nor float32 tiles); anything else (batch-1 decode but on sm_90
# below, prefill chunks, 32 local heads of a tensor-parallel rank, other GPUs) keeps SPARSE_ATTN_CONFIG, or
# SPARSE_ATTN_BATCH_CONFIG where that applies.
SPARSE_ATTN_LONG_CONFIG = dict(block_h=64, block_k=64, num_warps=8, waves=1.0)
SPARSE_ATTN_LONG_ROWS = 8192
SPARSE_ATTN_DECODE_MIN_BATCH = 8
# On sm_90 (H100 / H200) in bf16 / fp16 the long-list setting's chunks run as `gluon_sparse_attn`'s kernel: the same
# tiles, each tile's scores split between the two warpgroups where Triton's code computes them in both, the index
# loads a tile ahead, one exchange between the warpgroups per tile. Alone on the H200 (session 25's job 11, us per
# call, 10 calls per graph, docs/performance.md), against the Triton setting: HCA batch 32 / 8 at 1M context 105 /
# 44 against 164 / 65, at 128K 28-30 / 18.5-19.6 against 40-41 / 20-22; CSA batch 32 at 8K 22-23 against 30. Long
# lists take it from batch 1 (the other settings from batch 8): HCA's 8,320 slots of a 1M-token cache at batch 1 / 4
# 19 / 36 against 24 / 57 us with the default setting, every slot filled (job 10; the list's length follows the
# cache, not the context: a mostly empty list was not measured); lists of 1,152 at batch 1-2 (HCA at 128K) were
# faster without it (9.5-12.0 against 12.0-12.5), CSA's 640 at batch 8 within 0.7 us either way. Its tiles (queries,
# two 64-key stages and the probabilities: 200 KiB at 512 dims, `gluon_sparse_attn.shared_bytes`) need the 227 KiB
# an sm_90 program may opt into.
SPARSE_ATTN_WGMMA_CONFIG = SPARSE_ATTN_LONG_CONFIG | dict(wgmma=True)


def sparse_attn_config(q_shape: tuple[int, ...], entries: int, item_bytes: int, sms: int, shared_bytes: int,
                       capability: tuple[int, int] = (0, 0)) -> dict:
    """The Triton sparse attention's launch setting for queries of shape `q_shape` (B, S, H, D) over `entries` index
    slots each, `item_bytes`-byte elements, on a GPU of `sms` SMs, `shared_bytes` of shared memory per program and
    compute `capability`: SPARSE_ATTN_WGMMA_CONFIG, SPARSE_ATTN_LONG_CONFIG or SPARSE_ATTN_BATCH_CONFIG where the
    comments above say, else SPARSE_ATTN_CONFIG. Shapes, dtype and GPU only, so a captured graph keeps one kernel."""
    batch, steps, heads, dim = q_shape
    dim_p2 = 1 << (dim - 1).bit_length()

    def fits(config: dict) -> bool:      # queries and two stages of keys (triton_sparse_attn's num_stages=2)
        return (2 * config["block_k"] + config["block_h"]) * dim_p2 * item_bytes <= shared_bytes

    if steps != 1 or batch > sms // 4:
        return SPARSE_ATTN_CONFIG
    long = SPARSE_ATTN_LONG_CONFIG
    is_long = batch * entries >= SPARSE_ATTN_LONG_ROWS and heads % long["block_h"] == 0 and fits(long)
    if is_long:
        from ascend.backends.gluon_sparse_attn import supports      # Triton's wheel: present with the kernels
        if supports(capability, item_bytes, dim, long["block_h"], long["block_k"], long["num_warps"], shared_bytes):
            return SPARSE_ATTN_WGMMA_CONFIG
    if batch < SPARSE_ATTN_DECODE_MIN_BATCH:
        return SPARSE_ATTN_CONFIG
    if is_long:
        return long
    return SPARSE_ATTN_BATCH_CONFIG if fits(SPARSE_ATTN_BATCH_CONFIG) else SPARSE_ATTN_CONFIG


# Quantised-weight kernels (triton_moe.expert_matmul picks per-selection `gemv` or tensor-core `grouped` by rows),
# per format, for the routed experts (EXPERT_) and for projections (LINEAR_: one weight, so the grid has only
# out / block_out programs and wants smaller blocks; small grids also split their inputs, triton_moe.split_k_for).
# gemv: 32 output rows per program (fp8 projections 64), fp4 experts walk 256 inputs (4 KiB of packed bytes) per
# step, fp8 128 (one scale block); grouped: 64 x 128 tiles for experts, 32 x 128 (fp8) / 32 x 256 (fp4) for
# projections, rows per dot from the shapes. From scripts/bench_moe.py's variants on an H200: the fp4 expert tile
# of 128 inputs (1.3-1.8x over 256 at batch 8-64), the fp4 expert gemv's 256 inputs (fastest of 128-512 at batch
# 1-64, 7% over 512 at batch 8) and the fp8 projection gemv's 64 rows and 8 warps (faster than 32 rows / 4 warps
# for wq_a, wq_b and wo_b at batch 1; docs/performance.md); the rest untuned. Those runs read warm weights; with
# weights cold in L2 (1e48e90) the gemv settings still led: the joint experts' w1 + w3 at batch 1 42.7 us against
# 45.3-55.8 for the other block sizes, w2 27.3 against 28.9-33.7, wo_b 13.3 against 20.0 with 32 rows / 4 warps.
EXPERT_MATMUL_CONFIG = {
    "fp4": dict(gemv=dict(block_out=32, block_in=256, num_warps=4), grouped=dict(block_out=64, block_in=128)),
    "fp8": dict(gemv=dict(block_out=32, block_in=128, num_warps=4), grouped=dict(block_out=64, block_in=128))}
LINEAR_MATMUL_CONFIG = {
    "fp4": dict(gemv=dict(block_out=32, block_in=512, num_warps=4), grouped=dict(block_out=32, block_in=256)),
    "fp8": dict(gemv=dict(block_out=64, block_in=128, num_warps=8), grouped=dict(block_out=32, block_in=128))}
# `f32_linear` at one row (bf16 weights): the fp8 projection gemv's setting, untuned for bf16
F32_GEMV_CONFIG = LINEAR_MATMUL_CONFIG["fp8"]["gemv"]


# The Triton stages are custom operators so that torch.compile keeps each one as a single opaque node (with a fake
# implementation giving its output shape) instead of tracing into the launch code.
@torch.library.custom_op("ascend_cuda::sparse_attn", mutates_args=())
def sparse_attn_triton(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Triton sparse attention on CUDA tensors (same contract as `sparse_attn_sdpa`), launched as
    `sparse_attn_config` picks."""
    from ascend.backends import triton_sparse_attn
    return triton_sparse_attn.sparse_attn(q, kv, indices, sink, scale, **sparse_attn_setting(q, indices.size(-1)))


def sparse_attn_setting(q: torch.Tensor, entries: int) -> dict:
    """`sparse_attn_config` for queries `q` over `entries` slots each on q's GPU."""
    from ascend.backends import triton_common
    return sparse_attn_config(tuple(q.shape), entries, q.element_size(), triton_common.sm_count(q.device),
                              triton_common.shared_memory(q.device), triton_common.capability(q.device))


@sparse_attn_triton.register_fake
def _(q, kv, indices, sink, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("ascend_cuda::indexer_scores", mutates_args=())
def indexer_scores_triton(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                          n_visible: torch.Tensor) -> torch.Tensor:
    """Fused Triton indexer scores, float32 [B,S,T] (same contract as `indexer_scores_bmm`)."""
    from ascend.backends import triton_sparse_attn
    return triton_sparse_attn.indexer_scores(q, k, weights, n_visible, **INDEXER_CONFIG)


@indexer_scores_triton.register_fake
def _(q, k, weights, n_visible):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32)


@torch.library.custom_op("ascend_cuda::topk", mutates_args=())
def topk_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Triton radix select: the `k` largest of each row, int32 [..., k] in index order, -1 after them; -inf never
    picked, ties at the k-th score to the lowest indices (the `kernels.indexer_topk` contract)."""
    from ascend.backends import triton_sparse_attn
    return triton_sparse_attn.topk(scores, k)


@topk_triton.register_fake
def _(scores, k):
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.int32)


def indexer_scores_fused(q, k, weights, n_visible):
    """The fused Triton indexer scores (`kernels.indexer_scores`' contract). The visible counts are made the kernel's
    int32 here, outside the custom operator, so that a compiled step computes them so in the kernel that derives
    them (inside, the conversion was a launch of its own on CSA's selection path)."""
    return indexer_scores_triton(q, k, weights, n_visible.to(torch.int32))


def indexer_topk_triton(q, k, weights, n_visible, topk, group=None):
    """Fused Triton indexer scores, then the Triton radix select (`indexer_topk_bmm`'s output, ties at the k-th
    score to the lowest indices at every row length)."""
    return topk_triton(sum_scores(indexer_scores_fused(q, k, weights, n_visible), group), topk)


@torch.library.custom_op("ascend_cuda::compress_decode", mutates_args=("state_kv", "state_score"))
def compress_decode_triton(kv: torch.Tensor, score: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor,
                           state_kv: torch.Tensor, state_score: torch.Tensor, ratio: int,
                           overlap: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton compressor step at one token per sequence: the blocks' ids and complete flags [B, 2] and the pooled
    entries float32 [B, 2, d], the state updated in place (`triton_compressor.compress_decode`)."""
    from ascend.backends import triton_compressor
    return triton_compressor.compress_decode(kv, score, start, n_valid, state_kv, state_score, ratio, overlap)


@compress_decode_triton.register_fake
def _(kv, score, start, n_valid, state_kv, state_score, ratio, overlap):
    b = kv.size(0)
    return (kv.new_empty(b, 2, dtype=torch.int64), kv.new_empty(b, 2, dtype=torch.bool),
            kv.new_empty(b, 2, kv.size(-1) // (2 if overlap else 1), dtype=torch.float32))


@torch.library.custom_op("ascend_cuda::index_rotate", mutates_args=())
def index_rotate_triton(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp4_block: int) -> torch.Tensor:
    """`Kernels.index_rotate`: the indexer's RoPE, Hadamard and FP4 simulation in one Triton launch
    (`triton_index_rotate`), the Hadamard as `hadamard_matmul` computes it for bf16 (+-1 products, float32 sums,
    then the scale)."""
    from ascend.backends import triton_index_rotate
    return triton_index_rotate.index_rotate(q, cos, sin, _hadamard_matrix(q.size(-1), q.device, torch.bfloat16),
                                            fp4_block)


@index_rotate_triton.register_fake
def _(q, cos, sin, fp4_block):
    return q.new_empty(q.shape)


def compress_blocks_triton(kv: torch.Tensor, score: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor,
                           state_kv: torch.Tensor, state_score: torch.Tensor, ratio: int,
                           overlap: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernels.compress_blocks`: a decode step (one token per sequence) in one Triton launch that writes the
    token into the state, reads the state only where the token completes a block and gives the blocks' ids and
    flags too; chunks (prefill) take the reference's staging."""
    if kv.size(1) != 1:
        return REFERENCE.compress_blocks(kv, score, start, n_valid, state_kv, state_score, ratio, overlap)
    return compress_decode_triton(kv, score, start, n_valid, state_kv, state_score, ratio, overlap)


@torch.library.custom_op("ascend_cuda::gate_topk", mutates_args=())
def gate_topk_scored(logits: torch.Tensor, bias: torch.Tensor | None, topk: int,
                     route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `kernels.gate_topk` of a scored (not hash) layer: one launch (`triton_gate`)."""
    from ascend.backends import triton_gate
    return triton_gate.gate_topk(logits, bias, topk, route_scale)


@gate_topk_scored.register_fake
def _(logits, bias, topk, route_scale):
    lead = logits.shape[:-1]
    return (logits.new_empty(*lead, topk, dtype=torch.float32), logits.new_empty(*lead, topk, dtype=torch.int64))


def gate_topk_triton(logits: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
                     input_ids: torch.Tensor | None, topk: int,
                     route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.gate_topk`: scored layers in one Triton launch; hash layers (a table lookup, no top-k) on the
    reference, which inductor fuses with its neighbours."""
    if tid2eid is not None:
        return REFERENCE.gate_topk(logits, bias, tid2eid, input_ids, topk, route_scale)
    return gate_topk_scored(logits, bias, topk, route_scale)


@torch.library.custom_op("ascend_cuda::expert_matmul", mutates_args=())
def expert_matmul_quant_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: str,
                               expert_idx: torch.Tensor, groups: list[torch.Tensor],
                               projection: bool = False) -> torch.Tensor:
    """Triton `kernels.expert_matmul` for fp4 / fp8 weights: the stored bytes are decoded in registers, never
    materialised in the activation dtype. `groups`: a precomputed grouping of `expert_idx`
    (`triton_moe.group_experts` / `strided_groups`), or [] to group here. `projection`: launch settings of
    LINEAR_MATMUL_CONFIG, and every row valid (a projection's rows never carry another rank's -1)."""
    from ascend.backends import triton_moe
    config = (LINEAR_MATMUL_CONFIG if projection else EXPERT_MATMUL_CONFIG)[fmt]
    return triton_moe.expert_matmul(x, weight, scale, fmt, expert_idx, all_valid=projection,
                                    groups=tuple(groups) or None, **config)


@expert_matmul_quant_triton.register_fake
def _(x, weight, scale, fmt, expert_idx, groups, projection=False):
    return x.new_empty(x.size(0), weight.size(1))


def expert_matmul_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                         expert_idx: torch.Tensor, groups: tuple | None = None,
                         formats: tuple[str, ...] = ("fp4", "fp8")) -> torch.Tensor:
    """`kernels.expert_matmul`: the Triton kernel for the quantised `formats` (fp4 is V4's routed experts), the
    reference otherwise."""
    if fmt in formats:
        return expert_matmul_quant_triton(x, weight, scale, fmt, expert_idx, list(groups or ()))
    return REFERENCE.expert_matmul(x, weight, scale, fmt, expert_idx)


def group_experts_triton(expert_idx: torch.Tensor, n_experts: int, fmt: str,
                         formats: tuple[str, ...] = ("fp4", "fp8")) -> tuple | None:
    """`kernels.group_experts`: the Triton expert kernels' grouping (one sort for a layer's calls) for the
    quantised `formats`; None for the others, which run the reference."""
    from ascend.backends import triton_moe
    return triton_moe.group_experts(expert_idx, n_experts, fmt) if fmt in formats else None


# Up to here the fused kernel (one weight read, decoded once per chunk of up to 64 rows) beats dequantising the whole
# weight and one cuBLAS matmul: scripts/bench_moe.py on an H200, fp8 wq_b / wo_b at V4-Flash shapes, 2.2-2.5x faster
# at 128 rows, 0.65-0.74x at 512 (where dequantise-once wins).
LINEAR_FUSED_MAX_ROWS = 128


# Unquantised (bf16) projections of 1-32 tokens with at most PLAIN_MATMUL_MAX_OUT outputs (per group) run
# `triton_linear.matmul` instead of cuBLAS (where one row does not take the float32 walk first: a plain projection of
# at most F32_GEMV_MAX_OUT outputs). scripts/bench_moe.py --cases bf16 --batch 1,8,32 --variants on the H200
# (session 28, docs/performance.md), us at 1 / 8 / 32 rows, weights cold in L2, against cuBLAS: wo_a (8 groups of
# 4096 -> 1024) 18.1 / 18.4 / 19.5 against 19.3 / 22.3 / 23.3; wo_b (8192 -> 4096) 19.2 / 19.5 / 20.5 against 21.5 /
# 22.1 / 23.1; the indexer's wq_b (1024 -> 8192) 5.8 / 6.0 / 6.2 against 6.8 / 7.0 / 7.2; at 8 / 32 rows the joint
# wq_a + wkv (4096 -> 1536) 6.2 / 7.4 against 8.4 / 8.8 and the indexer's weights (4096 -> 64) 3.8 / 5.6 against 6.9
# / 7.1. wq_b (1024 -> 32,768: 512 output blocks, several waves of programs, where cuBLAS reads at its best) keeps
# cuBLAS: 18.8 / 19.5 / 21.7 against 18.7 / 19.3 / 20.0. The setting was the fastest of the variants timed (3-4
# stages, 256 inputs per step, 128 output rows on 8 warps, 32 output rows by 256 inputs, 1-4 input splits) or within
# 0.3 us of it at every shape it runs but the indexer's weights at 32 rows (5.6 against 4.9 with 256 inputs per
# step). Only on GPUs with bf16 tensor cores (`plain_matmul_supported`: sm_80 on); tuned on the H200 alone, with
# fewer pipeline stages where shared memory is smaller. A bf16 checkpoint's shared-expert projections take it too
# (w1 + w3: 4,096 outputs; w2), not timed.
PLAIN_MATMUL_CONFIG = dict(block_out=64, block_in=128, num_warps=4, num_stages=5)
PLAIN_MATMUL_MAX_ROWS = 32
PLAIN_MATMUL_MAX_OUT = 8192


def plain_matmul_applies(rows: int, n_out: int, dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether a bf16 projection (plain or grouped) of `rows` tokens and `n_out` outputs per group takes
    `plain_matmul_triton` (else cuBLAS), from shapes and dtypes alone."""
    return (dtype == weight_dtype == torch.bfloat16 and 1 <= rows <= PLAIN_MATMUL_MAX_ROWS
            and n_out <= PLAIN_MATMUL_MAX_OUT)


@torch.library.custom_op("ascend_cuda::plain_matmul", mutates_args=())
def plain_matmul_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`triton_linear.matmul` with PLAIN_MATMUL_CONFIG: x [M, G, in] and weight [G * out, in] -> [M, G, out]."""
    from ascend.backends import triton_linear
    return triton_linear.matmul(x, weight, **PLAIN_MATMUL_CONFIG)


@plain_matmul_triton.register_fake
def _(x, weight):
    return x.new_empty(x.size(0), x.size(1), weight.size(0) // x.size(1))


def linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                  formats: tuple[str, ...] = ("fp4", "fp8"), plain: bool = True) -> torch.Tensor:
    """`kernels.linear` for decode: an fp8 / fp4 projection of at most LINEAR_FUSED_MAX_ROWS tokens runs the expert
    kernels with one "expert" (the stored bytes decoded in registers: one row per GEMV, more rows grouped into
    tensor-core tiles) instead of dequantising the whole weight into the activation dtype every call; larger inputs
    (prefill) keep the reference, whose dequantisation is amortised over the rows. A bf16 projection of one row
    with few outputs (V4's indexer weights_proj; any bf16 layer of a bf16 checkpoint) takes the float32 walk,
    rounded once to bf16 as cuBLAS rounds its float32 sums (which it would add up in a second, split-K launch); other
    bf16 projections of a few rows, `plain_matmul_triton` (`plain_matmul_applies`; `plain`: the GPU has the kernel,
    `plain_matmul_supported`)."""
    y = _walk_one_row(x, weight) if fmt == "bf16" else None
    if y is not None:
        return y.to(x.dtype)
    rows = x.numel() // x.size(-1)
    if plain and fmt == "bf16" and plain_matmul_applies(rows, weight.size(0), x.dtype, weight.dtype):
        return plain_matmul_triton(x.reshape(rows, 1, x.size(-1)), weight).view(*x.shape[:-1], weight.size(0))
    if fmt not in formats or rows > LINEAR_FUSED_MAX_ROWS:
        return REFERENCE.linear(x, weight, scale, fmt)
    flat = x.reshape(rows, x.size(-1))
    idx = torch.zeros(rows, dtype=torch.int64, device=x.device)
    y = expert_matmul_quant_triton(flat, weight.unsqueeze(0), scale.unsqueeze(0), fmt, idx, [], projection=True)
    return y.reshape(*x.shape[:-1], weight.size(0))


def grouped_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                          formats: tuple[str, ...] = ("fp4", "fp8"), plain: bool = True) -> torch.Tensor:
    """`kernels.grouped_linear` for decode (attention's `wo_a`): each of the G groups is one "expert" of the expert
    kernels (its [out, in] block of the stored weight, decoded in registers), the tokens' group slices its rows;
    beyond LINEAR_FUSED_MAX_ROWS tokens (prefill) the reference dequantises once and runs one einsum. bf16 (as V4's
    checkpoints hold wo_a) for a few tokens: `plain_matmul_triton` (`plain_matmul_applies`, and `plain` as for
    `linear_triton`)."""
    groups, d_in = x.size(-2), x.size(-1)
    tokens = x.numel() // (groups * d_in)
    out = weight.size(0) // groups
    if plain and fmt == "bf16" and plain_matmul_applies(tokens, out, x.dtype, weight.dtype):
        return plain_matmul_triton(x.reshape(tokens, groups, d_in), weight).view(*x.shape[:-1], out)
    if fmt not in formats or tokens > LINEAR_FUSED_MAX_ROWS or (fmt == "fp8" and out % 128):
        return REFERENCE.grouped_linear(x, weight, scale, fmt)
    from ascend.backends import triton_moe
    idx = torch.arange(groups, device=x.device).repeat(tokens)
    y = expert_matmul_quant_triton(x.reshape(tokens * groups, d_in), weight.view(groups, out, -1),
                                   scale.view(groups, -1, scale.size(-1)), fmt, idx,
                                   list(triton_moe.strided_groups(tokens, groups, x.device, fmt)), projection=True)
    return y.view(*x.shape[:-1], out)


def triton_expert_formats() -> tuple[str, ...]:
    """Both quantised formats need sm_89+ (Ada, Hopper): Triton's float8_e4m3fn loads, and the fp4 walk's e4m3 ->
    float16 conversion (`triton_moe._e2m1_words_to_f16`); older GPUs run the reference for both."""
    old_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9)
    return () if old_gpu else ("fp4", "fp8")


def plain_matmul_supported() -> bool:
    """`triton_linear`'s bf16 tensor-core dots need sm_80+ (Ampere) on an NVIDIA GPU; ROCm and older GPUs keep the
    reference; Triton's CPU interpreter runs it anywhere. Decided once per kernel table, as the formats above."""
    if not torch.cuda.is_available():
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 0)


def triton_available() -> bool:
    """True when the Triton kernels can run: a CUDA device and an importable `triton`."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def triton_runs_on(device_type: str) -> bool:
    """True when the Triton kernels can run on tensors of `device_type`: natively on CUDA, or anywhere through
    Triton's interpreter (TRITON_INTERPRET=1; slow, for tests and benchmark checks on CPU)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    return interpreted or (device_type == "cuda" and triton_available())


def make_kernels(use_triton: bool | None = None, for_compile: bool = False) -> Kernels:
    """The CUDA `Kernels`: Triton attention stages, fp4 / fp8 expert matmul, decode-sized fp4 / fp8 / bf16
    projections (plain and grouped; bf16: `ascend.backends.triton_linear`), one-row float32 and bf16 projections,
    scored MoE routing (`ascend.backends.triton_gate`), the mHC stages (`ascend.backends.triton_mhc`), the greedy
    pick (`ascend.backends.triton_argmax`), the compressor's decode step (`ascend.backends.triton_compressor`) and
    the indexer's rotation of its queries and keys (`ascend.backends.triton_index_rotate`) when available
    (default), else the PyTorch ones; every other stage is the reference, except rms_norm / rope / hadamard /
    f32_linear (and, compiled, fp4_round_trip).

    Eager (default): the short rms_norm / rope / hadamard forms (fewest launches). `for_compile=True`: the table for
    `compile_decode`: the reference rms_norm and the pointwise RoPE (float32 pointwise chains that inductor fuses
    with their neighbours; the complex-number RoPE does not compile), the matmul Hadamard and the float-arithmetic
    FP4 simulation."""
    if use_triton is None:
        use_triton = triton_available()
    short = dict(hadamard=hadamard_matmul, f32_linear=f32_linear_bf16) | (
        dict(rope=rope_pointwise, fp4_round_trip=quant.fp4_round_trip_float) if for_compile
        else dict(rms_norm=rms_norm_fused, rope=rope_complex))
    if use_triton:
        from ascend.backends import triton_argmax, triton_mhc     # import triton: only here

        formats, plain = triton_expert_formats(), plain_matmul_supported()
        short["f32_linear"] = f32_linear_triton      # one-row router / compressor projections: the Triton walk
        return dataclasses.replace(REFERENCE, sparse_attn=sparse_attn_triton, indexer_topk=indexer_topk_triton,
                                   indexer_scores=indexer_scores_fused, select_topk=topk_triton,
                                   expert_matmul=functools.partial(expert_matmul_triton, formats=formats),
                                   group_experts=functools.partial(group_experts_triton, formats=formats),
                                   grouped_expert_formats=formats,
                                   linear=functools.partial(linear_triton, formats=formats, plain=plain),
                                   grouped_linear=functools.partial(grouped_linear_triton, formats=formats,
                                                                    plain=plain),
                                   hc_pre=triton_mhc.hc_pre, hc_post=triton_mhc.hc_post, hc_head=triton_mhc.hc_head,
                                   gate_topk=gate_topk_triton, argmax=triton_argmax.argmax,
                                   compress_blocks=compress_blocks_triton, index_rotate=index_rotate_triton, **short)
    return dataclasses.replace(REFERENCE, sparse_attn=sparse_attn_sdpa, indexer_topk=indexer_topk_bmm,
                               indexer_scores=indexer_scores_bmm, **short)


# Inductor settings of `compile_decode`. combo_kernels: independent small kernels of the step (the pointwise and
# reduction tails of separate stages) share one launch; what is left of a decode step after fusion is mostly such
# kernels of 1-2 us. On an H200 at V4-Flash shapes, batch 8 and 32, context 8K, it took a compiled CSA layer from
# 280-329 to 245-289 us and an HCA layer from 167-213 to 148-188 us (scripts/bench_attention.py, docs/performance.md).
INDUCTOR_CONFIG = {"combo_kernels": True, "triton.enable_pdl": True}
# triton.enable_pdl: inductor's kernels launched with programmatic dependent launch on sm_90+, as the backend's own
# are; `triton_common.PDL` off turns both off (read when `compile_decode` is called); torch versions without it
# compile without it.


def compile_decode(step: Callable, eager_numerics: bool = True, **options) -> Callable:
    """`torch.compile` a decode step (an `Attention` layer, a whole-model step, any function) as ONE static graph:
    inductor, `fullgraph=True` (a graph break is an error, not a silent slow path), `dynamic=False` (every shape is
    fixed per batch bucket and cache capacity, so kernels are specialised to them).

    The step's modules should use `make_kernels(for_compile=True)` (`model.kernels.use_kernels`); the cache's
    row writes are `index_put_`s, which inductor keeps in place. Compilation happens at the first call of each new
    shape (seconds to tens of seconds); replay the compiled step from a captured graph
    (`Device.graph()`, `ascend.graph.DecodeGraphRunner`) so that launches cost nothing: no CUDA graphs of inductor's
    own (default mode). `options` go to `torch.compile` (e.g. `mode="max-autotune-no-cudagraphs"`, or
    `backend="aot_eager"` to check tracing without code generation).

    Inductor runs with INDUCTOR_CONFIG (an `options={...}` given here overrides it). `eager_numerics` (default)
    compiles with inductor's `emulate_precision_casts`: fused code rounds to bf16 wherever the eager step does.
    Without it inductor keeps fused intermediates in float32, which is more precise but moves values across the
    FP4 / FP8 simulations' rounding boundaries: the indexer then picks other entries and a CSA layer's output moved
    by 13-26% (relative norm) at V4-Flash shapes on the H200 (HCA, without an indexer: 0.4%).

    Each shape is one more entry of the step's compile cache: call `torch._dynamo.reset()` between unrelated
    shapes rather than exceed dynamo's recompile limit (8), past which it silently runs eagerly.
    """
    compiled = torch.compile(step, **{"fullgraph": True, "dynamic": False, **options})
    config = {**INDUCTOR_CONFIG, "emulate_precision_casts": eager_numerics}
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        config.pop("triton.enable_pdl", None)
    elif importlib.util.find_spec("triton") is not None:
        from ascend.backends import triton_common
        config["triton.enable_pdl"] = config["triton.enable_pdl"] and triton_common.PDL

    def run(*args, **kwargs):
        # inductor reads its config when it compiles, i.e. inside the first call of each shape
        with torch._inductor.config.patch(**config):
            return compiled(*args, **kwargs)
    return run

"""The long-list decode sparse attention for Hopper (sm_90) in Gluon, Triton's lower-level dialect, where the kernel
chooses its own layouts.

What it changes against `triton_sparse_attn._sparse_attn_partial_kernel` (its arguments but the constexprs D_P2,
PRECISION and PDL; the same partials and merge):
a decode query's 64 heads x 512 dims in one program of two warpgroups, as the 64-head Triton setting has them, but the
scores of each 64-key tile split between the warpgroups (32 keys each) instead of computed by both. Triton lays a
product whose result feeds another product (QK^T into PV, the flash-attention chain) with every warp along its rows;
at 64 rows that is one warpgroup's worth, so its 8 warps compute the 64 x 64 scores twice (two chains of 32
`HGMMA.64x32x16` per warpgroup in its sm_90 code). Here each warpgroup issues 32 per tile, exchanges row maxima with
the other through shared memory (Gluon's cross-warp reduction; the sums are kept per key slot and added up once at
the end), loads the index list a tile ahead of its use, and writes its half of the probabilities
to a shared tile that both read for PV, each for its half of the 512 output dims. The next tile's rows are copied
(cp.async) into the other of two shared buffers while one is computed; the queries' 64 KiB, two 64 KiB key tiles and
the probabilities' 8 KiB make 200 KiB (205,312 bytes compiled) of the H100 / H200's 227.

The CUDA backend launches it for decode over long index lists (`cuda.sparse_attn_config`), on sm_90 GPUs, bf16 or
fp16. Triton's CPU interpreter cannot run Gluon, so the CPU suite compiles it for sm_90 (its structure checked in
tests/ascend/backends/test_triton_compile.py) and the GPU tests compare it with the Triton kernel and the reference.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

HOPPER = (9, 0)       # wgmma: sm_90 only (sm_100 has other tensor-core instructions)
BLOCK_H = 64          # heads per program: one wgmma row block
NUM_WARPS = 8         # two warpgroups
SCRATCH_BYTES = 512   # the compiler's own shared memory beside the tiles (its cross-warp exchanges), as compiled


def shared_bytes(dim: int, block_k: int) -> int:
    """Shared memory of one program for 2-byte elements: queries, two key tiles, the probabilities, the compiler's
    scratch (205,312 bytes at 512 dims and 64 keys, as the sm_90 compile reports; 344,576 at 128 keys, too many)."""
    return 2 * (BLOCK_H * dim + 2 * block_k * dim + BLOCK_H * block_k) + SCRATCH_BYTES


def supports(capability: tuple[int, int], item_bytes: int, dim: int, block_h: int, block_k: int,
             num_warps: int | None, shared_bytes_per_program: int) -> bool:
    """Whether the kernel runs these: an sm_90 GPU (`triton_common.capability`), 2-byte floats (bf16 / fp16; 0 for
    other dtypes), BLOCK_H heads per program, NUM_WARPS warps,
    256 or 512 dims and 32 or 64 keys per step (each has run on the H200: half the dims is one wgmma's N, at most 256;
    smaller tiles would spread the copies' layout over fewer columns than its threads, not tried), its tiles within
    `shared_bytes_per_program`. The one rule for `cuda.sparse_attn_config`'s choice and `triton_sparse_attn.
    sparse_attn`'s refusal."""
    return (capability == HOPPER and item_bytes == 2 and block_h == BLOCK_H and num_warps in (None, NUM_WARPS)
            and dim in (256, 512) and block_k in (32, 64) and shared_bytes(dim, block_k) <= shared_bytes_per_program)


@gluon.jit
def _tile_rows(idx_base, start, K, BLOCK_K: gl.constexpr, layout: gl.constexpr):
    """The kv rows of index slots start .. start + BLOCK_K (-1 past K) in `layout`."""
    offs = start + gl.arange(0, BLOCK_K, layout=layout)
    return gl.load(idx_base + offs, mask=offs < K, other=-1)


@gluon.jit
def _copy_tile(kv_smem, buf, kv_base, rows, T, skv_t, D: gl.constexpr, LOAD: gl.constexpr):
    """Start copying the kv `rows` (`_tile_rows` in LOAD's row slice) into buffer `buf` (one commit group); -1 or
    out-of-range rows copy nothing (zeros; their scores are masked to -inf anyway)."""
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    valid = (rows >= 0) & (rows < T)
    rows = gl.where(valid, rows, 0).to(gl.int64)
    async_copy.async_copy_global_to_shared(kv_smem.index(buf), kv_base + rows[:, None] * skv_t + dims[None, :],
                                           mask=valid[:, None] & (dims[None, :] < D))    # (the row mask, tile-wide)
    async_copy.commit_group()


@gluon.jit
def _sparse_attn_wgmma_kernel(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, o_ptr, m_ptr, l_ptr,
    S, H, T, K, chunk, scale,
    sq_b, sq_s, sq_h, skv_b, skv_t, si_b, si_s,
    D: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr, SINGLE: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    # scores: each warpgroup a 64 x BLOCK_K/2 block of keys; output: each warpgroup 64 x D/2 dims
    SCORES: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                     instr_shape=[16, BLOCK_K // 2, 16])
    OUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, D // 2, 16])
    LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])      # 16-byte copies along dims
    ROWS: gl.constexpr = gl.SliceLayout(1, SCORES)

    bs = gl.program_id(0)           # flattened (batch, query position)
    hb = gl.program_id(1)           # block of heads
    split = gl.program_id(2)        # chunk of the index list
    nsplit = gl.num_programs(2)
    b = bs // S
    s = (bs % S).to(gl.int64)

    heads = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LOAD))
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    q = gl.load(q_ptr + b.to(gl.int64) * sq_b + s * sq_s + heads[:, None] * sq_h + dims[None, :],
                mask=(heads[:, None] < H) & (dims[None, :] < D), other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, D], gl.NVMMASharedLayout.get_default_for([BLOCK_H, D], dtype),
                                       q)
    kv_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_K, D],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_K, D], dtype))
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_K], dtype))

    k_start = split * chunk
    idx_base = idx_ptr + b.to(gl.int64) * si_b + s * si_s
    kv_base = kv_ptr + b.to(gl.int64) * skv_b
    tiles = (gl.minimum(chunk, K - k_start) + BLOCK_K - 1) // BLOCK_K
    ROWS_LOAD: gl.constexpr = gl.SliceLayout(1, LOAD)     # a tile's rows as its copy addresses them
    KEYS: gl.constexpr = gl.SliceLayout(0, SCORES)        # ... and as its scores' columns

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=ROWS)
    # the softmax sums kept per key slot (each warpgroup its own half), rescaled like the output and summed across
    # the warpgroups once at the end: one exchange through shared memory per tile (the maxima) instead of two
    l_acc = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=SCORES)
    acc = gl.zeros([BLOCK_H, D], gl.float32, layout=OUT)
    _copy_tile(kv_smem, 0, kv_base, _tile_rows(idx_base, k_start, K, BLOCK_K, ROWS_LOAD), T, skv_t, D, LOAD)
    # the index loads run a tile ahead of their use, so no iteration waits on one (the copy of tile j + 1 is issued
    # at the top of iteration j from rows loaded in iteration j - 1)
    copy_rows = _tile_rows(idx_base, k_start + BLOCK_K, K, BLOCK_K, ROWS_LOAD)
    key_rows = _tile_rows(idx_base, k_start, K, BLOCK_K, KEYS)
    for j in range(tiles):
        buf = j % 2
        gl.thread_barrier()         # both warpgroups are done with tile j - 1: its buffer and p_smem are free
        if j + 1 < tiles:
            _copy_tile(kv_smem, 1 - buf, kv_base, copy_rows, T, skv_t, D, LOAD)
        else:
            async_copy.commit_group()   # an empty group: "all but the newest group" is tile j either way
        copy_rows = _tile_rows(idx_base, k_start + (j + 2) * BLOCK_K, K, BLOCK_K, ROWS_LOAD)
        next_key_rows = _tile_rows(idx_base, k_start + (j + 1) * BLOCK_K, K, BLOCK_K, KEYS)
        async_copy.wait_group(1)
        fence_async_shared()        # this thread's copies (and, at j = 0, its part of q) visible to the tensor cores
        gl.thread_barrier()         # ... and every thread's
        kv = kv_smem.index(buf)
        scores = warpgroup_mma(q_smem, kv.permute((1, 0)), gl.zeros([BLOCK_H, BLOCK_K], gl.float32, SCORES),
                               use_acc=False, is_async=True)
        scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
        scores = gl.where(((key_rows >= 0) & (key_rows < T))[None, :], scores * scale, float("-inf"))
        key_rows = next_key_rows
        m_new = gl.maximum(m_i, gl.max(scores, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)          # all masked so far: keep zeros
        alpha = gl.exp(m_i - m_safe)
        p = gl.exp(scores - m_safe[:, None])
        l_acc = l_acc * alpha[:, None] + p
        m_i = m_new
        p_smem.store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, OUT))[:, None]
        acc = warpgroup_mma(p_smem, kv, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    async_copy.wait_group(0)
    l_i = gl.sum(l_acc, 1)

    heads_o = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, OUT))
    dims_o = gl.arange(0, D, layout=gl.SliceLayout(0, OUT))
    heads_r = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=ROWS)
    o_mask = (heads_o[:, None] < H) & (dims_o[None, :] < D)
    if SINGLE:      # one chunk: normalise here, exp(sink) in the denominator (as the Triton kernel)
        sink = gl.load(sink_ptr + heads_r, mask=heads_r < H, other=0.0)
        m_all = gl.maximum(m_i, sink)
        w = gl.exp(m_i - m_all)
        norm = gl.convert_layout(w / (l_i * w + gl.exp(sink - m_all)), gl.SliceLayout(1, OUT))
        row = (bs * H + heads_o).to(gl.int64)                            # out is contiguous [B, S, H, D]
        gl.store(out_ptr + row[:, None] * D + dims_o[None, :], (acc * norm[:, None]).to(out_ptr.dtype.element_ty),
                 mask=o_mask)
    else:           # unnormalised partial of this chunk, merged by triton_sparse_attn._merge_kernel
        part = ((bs * nsplit + split) * H + heads_o).to(gl.int64)      # [BS, NSPLIT, H] layout
        gl.store(o_ptr + part[:, None] * D + dims_o[None, :], acc, mask=o_mask)
        part_r = (bs * nsplit + split) * H + heads_r
        gl.store(m_ptr + part_r, m_i, mask=heads_r < H)
        gl.store(l_ptr + part_r, l_i, mask=heads_r < H)

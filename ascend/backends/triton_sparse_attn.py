"""Triton kernels for the hot decode stages of V4 attention on NVIDIA GPUs.

- `sparse_attn`: attention of every query over its own list of KV rows (window + selected
  compressed entries), single KV head (K = V), learned per-head sink in the denominator. Split-K
  ("flash-decoding"): the index list is cut into chunks that run on separate programs, so a single
  decode token still fills the GPU; a second kernel merges the partial softmaxes and adds the
  sink. On Hopper the long-list decode setting's chunks run as `gluon_sparse_attn`'s kernel (`wgmma=True`).
- `indexer_scores`: score[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t]) without ever
  writing the [B, S, H, T] product to memory (the unfused form needs ~2 GiB at B = 32, 1M tokens).
- `topk`: the k largest scores of each row (the indexer's selection): one program per row for short rows (the row in
  registers), longer rows by radix select spread over chunks: one launch whose chunks wait for each other between
  the bytes of the order key where the rows are few and short enough (decode up to 128K context), else one launch per
  byte (a 1M context's rows, prefill).

All launch with grid sizes that depend only on tensor shapes, so they are CUDA-graph capturable.
Importing this module needs Triton; `ascend.backends.cuda` imports it only when CUDA is present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend.backends.triton_common import (INTERPRETING, after_previous_kernel, arrival_tickets, capability,
                                           dot_precision, last_to_arrive, launch_options, shared_memory, sm_count)


@triton.jit
def _sparse_attn_partial_kernel(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, o_ptr, m_ptr, l_ptr,
    S, H, T, K, chunk, scale,
    sq_b, sq_s, sq_h, skv_b, skv_t, si_b, si_s,
    D: tl.constexpr, D_P2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    after_previous_kernel(PDL)
    bs = tl.program_id(0)           # flattened (batch, query position)
    hb = tl.program_id(1)           # block of heads
    split = tl.program_id(2)        # chunk of the index list
    nsplit = tl.num_programs(2)
    b = bs // S
    s = (bs % S).to(tl.int64)       # s * stride overflows int32 for long prefill chunks
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, D_P2)
    h_ok = heads < H
    d_ok = dims < D

    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + s * sq_s + heads[:, None] * sq_h + dims[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_P2], tl.float32)

    k_start = split * chunk
    idx_base = idx_ptr + b.to(tl.int64) * si_b + s * si_s
    kv_base = kv_ptr + b.to(tl.int64) * skv_b
    for k0 in range(0, chunk, BLOCK_K):   # chunk is a multiple of BLOCK_K
        offs = k_start + k0 + tl.arange(0, BLOCK_K)
        rows = tl.load(idx_base + offs, mask=offs < K, other=-1)
        valid = (rows >= 0) & (rows < T)
        rows = tl.where(valid, rows, 0).to(tl.int64)
        kv = tl.load(kv_base + rows[:, None] * skv_t + dims[None, :],
                     mask=valid[:, None] & d_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * scale    # [BLOCK_H, BLOCK_K] fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # all-masked so far: keep zeros
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
        m_i = m_new

    if SINGLE:      # one chunk: normalise here, with exp(sink) in the denominator, and write the output
        sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0)
        m_all = tl.maximum(m_i, sink)
        w = tl.exp(m_i - m_all)
        res = acc * (w / (l_i * w + tl.exp(sink - m_all)))[:, None]
        row = (bs * H + heads).to(tl.int64)                                 # out is contiguous [B, S, H, D]
        tl.store(out_ptr + row[:, None] * D + dims[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])
    else:           # unnormalised partial of this chunk, merged by `_merge_kernel`
        part = (bs * nsplit + split) * H + heads                        # [BS, NSPLIT, H] layout
        tl.store(o_ptr + part[:, None].to(tl.int64) * D + dims[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
        tl.store(m_ptr + part, m_i, mask=h_ok)
        tl.store(l_ptr + part, l_i, mask=h_ok)


MERGE_TILE = 8192        # float32 values of o one merge program loads at once: 64 per thread of its 4 warps
MERGE_HEADS = 16         # heads per merge program at most, whatever the sparse kernel's block (below)
MERGE_PIPELINED_SPLITS = 8      # chunks from which a merge program's loads are pipelined (`_merge_blocks`)
MERGE_STAGES = 3                # the pipelined loop's depth: loads of the next two chunks in flight


def _merge_blocks(queries: int, H: int, D: int, nsplit: int, device: torch.device) -> tuple:
    """(heads, dims, chunks, stages) per merge program and load. A grid of MERGE_HEADS heads and up to 128 dims that
    fills at least half the SMs keeps them, one chunk per load (several chunks per load made batch 32 slower: their
    sum over chunks crosses threads), its loop over the chunks pipelined (MERGE_STAGES) from MERGE_PIPELINED_SPLITS
    chunks on. In turn, each load waited for before the next, 8 / 9 / 15 chunks took 7.2 / 7.0 / 9.2 us, pipelined
    6.3 / 6.0 / 7.5 (an H200, 20 calls per graph, batch 16 / 8 / 8 of the 64-head setting: HCA at 128K and 1M); at
    3-4 chunks within 0.2 us or slower (batch 32: 7.5 against 6.9; 5-7 not measured), so those keep the plain loop
    (stages 1), as do several chunks per load (batch 4 at 1M, 33 chunks 16 at a time: 16.0 against 14.4). A smaller
    grid (batch-1 decode) has its blocks halved (heads down to 4, then dims down to 32) while it has fewer programs
    than SMs, then reads as many chunks per load as MERGE_TILE allows. At V4's batch 1 (20 chunks, 64 heads x 512), 16 x 128 blocks made 16
    programs, each waiting on 20 loads in turn (~6 us per layer in the batch-1 profile, docs/performance.md): now
    256 programs of 4 x 32, one load each. Blocks of the sparse kernel's 64 heads (its long-list setting) made the
    merge 3-12 us slower at batch 8 and 32 on an H200 (fewer, larger programs at batch 32; at batch 8, halved down to
    8 heads and several chunks per load): so the merge starts from 16 heads whatever that kernel's block."""
    heads, dims, sms = MERGE_HEADS, min(128, triton.next_power_of_2(D)), sm_count(device)
    grid = lambda: queries * triton.cdiv(H, heads) * triton.cdiv(D, dims)     # noqa: E731
    if 2 * grid() >= sms:
        return heads, dims, 1, MERGE_STAGES if nsplit >= MERGE_PIPELINED_SPLITS else 1
    while grid() < sms and (heads > 4 or dims > 32):
        heads, dims = (heads // 2, dims) if heads > 4 else (heads, dims // 2)
    return heads, dims, max(1, min(triton.next_power_of_2(nsplit), MERGE_TILE // (heads * dims))), 1


def _num_splits(programs: int, k_blocks: int, device: torch.device, waves: float) -> int:
    """Chunks of the index list per (query, head block): the most that keep the grid within `waves` programs per SM
    (at least one). `waves` is the number meant to be in flight per SM, so the grid runs as one round with no partial
    last one: a kernel of one program per SM at batch 32 (32 query blocks) takes 4 chunks, 128 programs, where 5 made
    160, a second round of 28 (HCA at 1M context on an H200: 171 against 256 us, docs/performance.md)."""
    return max(1, min(k_blocks, int(waves * sm_count(device)) // programs))


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
                block_h: int | None = None, block_k: int = 32, num_warps: int | None = None,
                waves: float = 2.0, wgmma: bool = False) -> torch.Tensor:
    """q [B,S,H,D], kv [B,T,D], indices [B,S,K] int32 (-1 = skip), sink [H] fp32 -> [B,S,H,D] in q's dtype.

    block_h: heads per program (16 / 32 / 64); block_k: rows per inner step; waves: programs per SM
    at most (`_num_splits`); wgmma: the chunks by `gluon_sparse_attn`'s Hopper kernel (sm_90 GPUs, bf16 / fp16,
    64 heads per program, 8 warps: `gluon_sparse_attn.supports`) instead of this module's; the merge the same.
    """
    B, S, H, D = q.shape
    T, K = kv.shape[1], indices.shape[-1]
    q, kv, indices = q.contiguous(), kv.to(q.dtype).contiguous(), indices.to(torch.int32).contiguous()
    sink = sink.float().contiguous()
    block_h = block_h or (16 if H <= 16 else 32)
    head_blocks = triton.cdiv(H, block_h)
    k_blocks = triton.cdiv(K, block_k)
    nsplit = _num_splits(B * S * head_blocks, k_blocks, q.device, waves)
    chunk = triton.cdiv(k_blocks, nsplit) * block_k
    nsplit = triton.cdiv(K, chunk)
    out = torch.empty_like(q)
    parts = [q.new_empty(0, dtype=torch.float32)] * 3
    if nsplit > 1:
        parts = [q.new_empty(B * S, nsplit, H, D, dtype=torch.float32),
                 q.new_empty(B * S, nsplit, H, dtype=torch.float32), q.new_empty(B * S, nsplit, H, dtype=torch.float32)]
    args = (q, kv, indices, sink, out, *parts, S, H, T, K, chunk, scale,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1))
    if wgmma:
        from ascend.backends import gluon_sparse_attn as G
        if not G.supports(capability(q.device), q.element_size() if q.is_floating_point() else 0, D, block_h,
                          block_k, num_warps, shared_memory(q.device)):
            raise ValueError(f"sparse_attn(wgmma=True) needs an sm_90 GPU, bf16 / fp16, block_h {G.BLOCK_H}, "
                             f"{G.NUM_WARPS} warps, head dim 256 or 512 and block_k 32 or 64 "
                             f"(gluon_sparse_attn.supports): got {q.device} {q.dtype}, block_h {block_h}, "
                             f"block_k {block_k}, num_warps {num_warps}, D {D}")
        G._sparse_attn_wgmma_kernel[(B * S, head_blocks, nsplit)](
            *args, D=D, BLOCK_H=block_h, BLOCK_K=block_k, SINGLE=nsplit == 1, num_warps=G.NUM_WARPS)
    else:
        _sparse_attn_partial_kernel[(B * S, head_blocks, nsplit)](
            *args, D=D, D_P2=triton.next_power_of_2(D), BLOCK_H=block_h, BLOCK_K=block_k, SINGLE=nsplit == 1,
            PRECISION=dot_precision(q.dtype),
            num_warps=num_warps or (8 if D >= 256 else 4), num_stages=2, **launch_options(q.device))
    if nsplit > 1:
        heads, dims, chunks, stages = _merge_blocks(B * S, H, D, nsplit, q.device)
        _merge_kernel[(B * S, triton.cdiv(H, heads), triton.cdiv(D, dims))](
            *parts, sink, out, H, nsplit, D=D, BLOCK_D=dims, BLOCK_H=heads, NSPLIT_P2=triton.next_power_of_2(nsplit),
            SPLIT_CHUNK=chunks, STAGES=stages, num_warps=4, **launch_options(q.device))
    return out


@triton.jit
def _merge_kernel(o_ptr, m_ptr, l_ptr, sink_ptr, out_ptr, H, NSPLIT,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, NSPLIT_P2: tl.constexpr,
                  SPLIT_CHUNK: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """Combine the chunk partials [BS, NSPLIT, H, (D)] of one query, block of heads and block of dims into the
    normalised output: each chunk's (o, m, l) rescaled to the largest max, the sink one more logit per head with a
    zero value. One launch where the same lines in PyTorch were 8-10 kernels (each a launch in a decode step).

    The maxima and sums of all chunks are read at once (a few values per head); the partial outputs SPLIT_CHUNK
    chunks per load (all of them at batch-1 decode: one round trip to memory, not one per chunk). The blocks come
    from `_merge_blocks`."""
    after_previous_kernel(PDL)
    bs = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    h_ok = heads < H
    d_ok = dims < D
    splits = tl.arange(0, NSPLIT_P2)
    ml = (bs * NSPLIT + splits[:, None]).to(tl.int64) * H + heads[None, :]            # [NSPLIT_P2, BLOCK_H]
    ok = (splits[:, None] < NSPLIT) & h_ok[None, :]
    m = tl.load(m_ptr + ml, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + ml, mask=ok, other=0.0)
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0)
    m_all = tl.maximum(tl.max(m, 0), sink)                         # finite: the sink always counts
    denom = tl.sum(l * tl.exp(m - m_all[None, :]), 0) + tl.exp(sink - m_all)         # -inf chunks weigh 0
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s0 in tl.range(0, NSPLIT, SPLIT_CHUNK, num_stages=STAGES):
        chunk = s0 + tl.arange(0, SPLIT_CHUNK)
        rows = (bs * NSPLIT + chunk[:, None]).to(tl.int64) * H + heads[None, :]      # [SPLIT_CHUNK, BLOCK_H]
        c_ok = (chunk[:, None] < NSPLIT) & h_ok[None, :]
        w = tl.exp(tl.load(m_ptr + rows, mask=c_ok, other=float("-inf")) - m_all[None, :])
        o = tl.load(o_ptr + rows[:, :, None] * D + dims[None, None, :], mask=c_ok[:, :, None] & d_ok[None, None, :],
                    other=0.0)
        acc += tl.sum(w[:, :, None] * o, 0)
    out = (bs * H + heads).to(tl.int64)                            # out is contiguous [B, S, H, D]
    tl.store(out_ptr + out[:, None] * D + dims[None, :], (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _indexer_scores_kernel(
    q_ptr, k_ptr, w_ptr, nv_ptr, out_ptr,
    S, H, T, part_tiles,
    sq_b, sq_s, sq_h, sk_b, sk_t, sw_b, sw_s, snv_b, so_b, so_s,
    D: tl.constexpr, D_P2: tl.constexpr, H_P2: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
    STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """Program (query, part): the scores of `part_tiles` tiles of BLOCK_T keys from key part * part_tiles * BLOCK_T,
    the query's heads and weights loaded once, the keys of the next tiles loaded while one is scored (STAGES). The
    keys are the product's rows (logits [BLOCK_T, heads]): the sum over heads then stays within each thread's part
    of a key's row plus a few shuffles, where heads as rows summed across warps through shared memory every tile."""
    after_previous_kernel(PDL)
    bs = tl.program_id(0)
    part = tl.program_id(1)
    b = (bs // S).to(tl.int64)
    s = (bs % S).to(tl.int64)       # s * stride overflows int32 for long prefill chunks
    heads = tl.arange(0, H_P2)
    dims = tl.arange(0, D_P2)
    h_ok = heads < H
    d_ok = dims < D
    q_t = tl.trans(tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + dims[None, :],
                           mask=h_ok[:, None] & d_ok[None, :], other=0.0))               # [D_P2, H_P2]
    w = tl.load(w_ptr + b * sw_b + s * sw_s + heads, mask=h_ok, other=0.0).to(tl.float32)
    n_visible = tl.load(nv_ptr + b * snv_b + s)
    first = part * part_tiles
    for tb in tl.range(first, tl.minimum(first + part_tiles, tl.cdiv(T, BLOCK_T)), num_stages=STAGES):
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        k = tl.load(k_ptr + b * sk_b + t[:, None].to(tl.int64) * sk_t + dims[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        logits = tl.maximum(tl.dot(k, q_t, input_precision=PRECISION), 0.0)             # [BLOCK_T, H_P2]
        score = tl.where(t < n_visible, tl.sum(logits * w[None, :], 1), float("-inf"))
        tl.store(out_ptr + b * so_b + s * so_s + t, score, mask=t_ok)


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, n_visible: torch.Tensor,
                   block_t: int = 64, num_warps: int = 4, per_sm: int | None = None,
                   num_stages: int = 2, tile_block_t: int | None = None) -> torch.Tensor:
    """q [B,S,H,D], k [B,T,D], weights [B,S,H], n_visible [B,S] -> fp32 [B,S,T], -inf where t >= n_visible.
    With `per_sm`, where that many programs per SM give every query two parts or more (decode) of two tiles or more,
    each query's keys are cut into parts of whole tiles of `block_t`, as many as keep the grid within `per_sm`
    programs per SM: one round of programs, no partial second one. Otherwise (prefill's many queries, or keys so
    few that a part would be one tile) a program per tile of `tile_block_t` keys (default `block_t`): a program
    loads the query's heads whatever its keys, so a lone tile had better be a large one."""
    B, S, H, D = q.shape
    T = k.shape[1]
    q, k = q.contiguous(), k.to(q.dtype)
    if k.stride(-1) != 1:               # rows may be strided (the cache's keys are a view without its last row)
        k = k.contiguous()
    weights, n_visible = weights.contiguous(), n_visible.to(torch.int32).contiguous()
    out = torch.empty(B, S, T, device=q.device, dtype=torch.float32)
    parts = per_sm * sm_count(q.device) // (B * S) if per_sm and B * S else 0
    # parts of several tiles where every query gets two or more; otherwise a program per tile, as without `per_sm`,
    # which nothing pipelines (STAGES 1: the loop runs once)
    part_tiles = triton.cdiv(triton.cdiv(T, block_t), parts) if parts >= 2 else 1
    if part_tiles < 2:
        block_t, part_tiles = tile_block_t or block_t, 1                                # T = 0: an empty grid
    n_tiles = triton.cdiv(T, block_t)
    _indexer_scores_kernel[(B * S, triton.cdiv(n_tiles, part_tiles))](
        q, k, weights, n_visible, out,
        S, H, T, part_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), weights.stride(0), weights.stride(1),
        n_visible.stride(0), out.stride(0), out.stride(1),
        D=D, D_P2=max(16, triton.next_power_of_2(D)), H_P2=max(16, triton.next_power_of_2(H)), BLOCK_T=block_t,
        PRECISION=dot_precision(q.dtype), STAGES=num_stages if part_tiles > 1 else 1, num_warps=num_warps,
        **launch_options(q.device),
    )
    return out


@triton.jit
def _order_key(x):
    """float32 -> int64 in [0, 2^32) with the same order: the bits, negative floats' magnitude bits flipped; -0.0
    is made +0.0 first, as the two compare equal."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 0x80000000


@triton.jit
def _byte_histogram(score, kth, SHIFT):
    """(256-bin histogram of byte SHIFT of the order keys of the finite `score`s whose higher bytes are kth's, which
    scores those are)."""
    key = _order_key(score)
    same = ((key >> (SHIFT + 8)) == (kth >> (SHIFT + 8))) & (score != float("-inf"))
    return tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=same), same


@triton.jit
def _range_histogram(base, start, end, kth, cand, SHIFT, BLOCK: tl.constexpr, keep):
    """`_byte_histogram` of the scores [start, end), blocks of -inf scores only skipped (entries not visible yet:
    prefill, cache tail). `keep`: also write the counted scores, in order, from cand[0]. Returns (histogram, how many
    were written)."""
    hist = tl.zeros([256], tl.int32)
    n_cand = tl.zeros([], tl.int32)
    for t0 in range(start, end, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        score = tl.load(base + t, mask=t < end, other=float("-inf"))
        if tl.max(score, 0) > float("-inf"):
            counts, same = _byte_histogram(score, kth, SHIFT)
            hist += counts
            if keep:
                tl.store(cand + n_cand + tl.cumsum(same.to(tl.int32), 0) - 1, score, mask=same)
                n_cand += tl.sum(same.to(tl.int32), 0)
    return hist, n_cand


@triton.jit
def _candidate_histogram(cand, n_cand, kth, SHIFT, BLOCK: tl.constexpr):
    """`_byte_histogram` of a chunk's `n_cand` candidates (the scores `_range_histogram` kept)."""
    hist = tl.zeros([256], tl.int32)
    for i0 in range(0, n_cand, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        counts, same = _byte_histogram(tl.load(cand + i, mask=i < n_cand, other=float("-inf")), kth, SHIFT)
        hist += counts
    return hist


@triton.jit
def _fill_unpicked(out, picked, start, K, stride, BLOCK: tl.constexpr):
    """-1 in the slots k >= picked of out[:K] that fall in the blocks start, start + stride, ..."""
    for k0 in range(start, K, stride):
        k = k0 + tl.arange(0, BLOCK)
        tl.store(out + k, tl.full([BLOCK], -1, tl.int32), mask=(k >= picked) & (k < K))


@triton.jit
def _kth_byte(hist, need, kth, SHIFT):
    """From one pass's histogram: the k-th key's byte SHIFT (the largest byte with at least `need` keys at or above
    it; 0 when the row has fewer), the keys still wanted among those equal to the k-th so far, and the k-th key with
    the byte added. Returns (byte, need, kth)."""
    bins = tl.arange(0, 256)
    higher = tl.sum(hist, 0) - tl.cumsum(hist, 0)               # keys with a larger byte than each bin's
    byte = tl.maximum(tl.max(tl.where(higher + hist >= need, bins, -1), 0), 0)
    return byte, need - tl.sum(tl.where(bins > byte, hist, 0), 0), kth | (byte.to(tl.int64) << SHIFT)


@triton.jit
def _write_picks(base, out, start, end, kth, need, n_sel, n_tie, BLOCK: tl.constexpr):
    """The picks among entries [start, end) in index order: keys above the k-th, and ties with it whose rank in the
    row (n_tie ties before `start`) is below `need`; written from out[n_sel]. Returns the picks written in all."""
    for t0 in range(start, end, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        score = tl.load(base + t, mask=t < end, other=float("-inf"))
        if tl.max(score, 0) > float("-inf"):        # as in `_range_histogram`
            key = _order_key(score)
            finite = score != float("-inf")
            tie = (key == kth) & finite
            tie_rank = n_tie + tl.cumsum(tie.to(tl.int32), 0) - 1
            sel = ((key > kth) | (tie & (tie_rank < need))) & finite
            tl.store(out + n_sel + tl.cumsum(sel.to(tl.int32), 0) - 1, t, mask=sel)
            n_sel += tl.sum(sel.to(tl.int32), 0)
            n_tie += tl.sum(tie.to(tl.int32), 0)
    return n_sel


@triton.jit
def _topk_row_kernel(scores_ptr, out_ptr, T, K, s_row, o_row, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row of T <= BLOCK entries, the row's order keys held in registers. The K-th largest key of
    the finite scores is found two bits at a time from the top: each step counts the keys at or above the three
    candidates that extend the bits found so far, in one sum (three 16-bit counts packed in an int64, so one
    reduction across the program per step, 16 in all, instead of a 256-bin histogram per byte), and keeps the
    largest candidate with at least K. Then `_write_picks` writes the entries above it and the lowest-index ties
    with it in index order, and -1 fills the slots left. -inf scores get key 0, below every candidate."""
    tl.static_assert(BLOCK < 65536)                 # a count must fit its 16 bits
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = scores_ptr + row * s_row
    t = tl.arange(0, BLOCK)
    score = tl.load(base + t, mask=t < T, other=float("-inf"))
    key = tl.where(score != float("-inf"), _order_key(score), 0)
    kth = tl.zeros([], tl.int64)
    for shift in range(30, -1, -2):
        step = tl.full([], 1, tl.int64) << shift
        packed = ((key >= (kth | step)).to(tl.int64) + ((key >= (kth | 2 * step)).to(tl.int64) << 16)
                  + ((key >= (kth | 3 * step)).to(tl.int64) << 32))
        n = tl.sum(packed, 0)
        n1, n2, n3 = n & 0xFFFF, (n >> 16) & 0xFFFF, n >> 32
        kth = tl.where(n3 >= K, kth | 3 * step, tl.where(n2 >= K, kth | 2 * step, tl.where(n1 >= K, kth | step, kth)))
    need = K - tl.sum((key > kth).to(tl.int64), 0)
    n_sel = _write_picks(base, out_ptr + row * o_row, 0, T, kth, need, tl.zeros([], tl.int32), tl.zeros([], tl.int32),
                         BLOCK)
    _fill_unpicked(out_ptr + row * o_row, n_sel, 0, K, BLOCK, BLOCK)


@triton.jit
def _radix_pass_kernel(scores_ptr, hist_ptr, above_ptr, sel_off_ptr, tie_off_ptr, state_ptr, tickets_ptr,
                       cand_ptr, cand_n_ptr, T, K, s_row, CHUNK, P, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
                       P_BLOCK: tl.constexpr, COMPACT: tl.constexpr, PDL: tl.constexpr):
    """One byte of the radix select, program (row, 0, chunk). Each program histograms byte SHIFT of the finite
    scores' order keys in its chunk, among the keys whose higher bytes equal the k-th key's found so far (pass 24:
    all), into its own slot of `hist`. The row's last program (`last_to_arrive`) sums the slots, finds the k-th key's
    byte, and adds to each chunk's count of keys above the k-th (those of a larger byte here); after the last byte
    it turns the counts into each chunk's output offset and its first tie rank (`_radix_write_kernel`).
    state[row] = (k-th key so far, picks still wanted among keys equal to it, picks in all). With COMPACT the pass
    of byte 16 also writes the scores whose top byte is the k-th key's, in order, to the chunk's part of `cand`
    (their count to `cand_n`), and the last two passes read only those."""
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2)
    bins = tl.arange(0, 256)
    if SHIFT == 24:
        kth = tl.zeros([], tl.int64)
        need = tl.zeros([], tl.int64) + K
    else:
        kth = tl.load(state_ptr + row * 3)
        need = tl.load(state_ptr + row * 3 + 1)
    base = scores_ptr + row * s_row
    cand = cand_ptr + (row * P + c) * CHUNK
    if SHIFT >= 16 or not COMPACT:                  # every entry of the chunk; in the pass of byte 16 with COMPACT,
        # the entries of the k-th key's top byte kept as the next passes' only ones
        hist, n_cand = _range_histogram(base, c * CHUNK, tl.minimum((c + 1) * CHUNK, T), kth, cand, SHIFT, BLOCK,
                                        COMPACT and SHIFT == 16)
        if COMPACT and SHIFT == 16:
            tl.store(cand_n_ptr + row * P + c, n_cand)
    else:                                           # the chunk's candidates only
        hist = _candidate_histogram(cand, tl.load(cand_n_ptr + row * P + c), kth, SHIFT, BLOCK)
    tl.store(hist_ptr + (row * P + c) * 256 + bins, hist)
    if last_to_arrive(tickets_ptr, P):
        parts = row * P + tl.arange(0, P_BLOCK)
        total = tl.zeros([256], tl.int32)
        for p0 in range(0, P, P_BLOCK):             # the other programs' slots, read from L2 (`.cg`)
            ok = (p0 + tl.arange(0, P_BLOCK) < P)[:, None]
            total += tl.sum(tl.load(hist_ptr + (parts[:, None] + p0) * 256 + bins[None, :], mask=ok, other=0,
                                    cache_modifier=".cg"), 0)
        byte, need, kth = _kth_byte(total, need, kth, SHIFT)
        tie_before = tl.zeros([], tl.int32)
        sel_before = tl.zeros([], tl.int32)
        for p0 in range(0, P, P_BLOCK):
            chunk = p0 + tl.arange(0, P_BLOCK)
            ok = chunk < P
            tile = tl.load(hist_ptr + (parts[:, None] + p0) * 256 + bins[None, :], mask=ok[:, None], other=0,
                           cache_modifier=".cg")
            above = tl.sum(tl.where(bins[None, :] > byte, tile, 0), 1)
            if SHIFT != 24:
                above += tl.load(above_ptr + parts + p0, mask=ok, other=0)
            if SHIFT == 0:  # the k-th key is known: ties kept in index order, offsets by exclusive prefix sums
                tie = tl.sum(tl.where(bins[None, :] == byte, tile, 0), 1)
                ties_first = tie_before + tl.cumsum(tie, 0) - tie
                picked = above + tl.minimum(tie, tl.maximum(need.to(tl.int32) - ties_first, 0))
                tl.store(tie_off_ptr + parts + p0, ties_first, mask=ok)
                tl.store(sel_off_ptr + parts + p0, sel_before + tl.cumsum(picked, 0) - picked, mask=ok)
                tie_before += tl.sum(tie, 0)
                sel_before += tl.sum(picked, 0)
            else:
                tl.store(above_ptr + parts + p0, above, mask=ok)
        tl.store(state_ptr + row * 3, kth)
        tl.store(state_ptr + row * 3 + 1, need)
        if SHIFT == 0:
            tl.store(state_ptr + row * 3 + 2, sel_before.to(tl.int64))


@triton.jit
def _radix_write_kernel(scores_ptr, out_ptr, sel_off_ptr, tie_off_ptr, state_ptr, T, K, s_row, o_row, CHUNK, P,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, 0, chunk) writes its chunk's picks (`_write_picks`) from the chunk's output offset, then its
    share of the -1 slots after the row's picks."""
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2)
    _write_picks(scores_ptr + row * s_row, out_ptr + row * o_row, c * CHUNK, tl.minimum((c + 1) * CHUNK, T),
                 tl.load(state_ptr + row * 3), tl.load(state_ptr + row * 3 + 1), tl.load(sel_off_ptr + row * P + c),
                 tl.load(tie_off_ptr + row * P + c), BLOCK)
    _fill_unpicked(out_ptr + row * o_row, tl.load(state_ptr + row * 3 + 2), c * BLOCK, K, P * BLOCK, BLOCK)


@triton.jit
def _wait_for_row(count_ptr, target):
    """A barrier of the programs of one row of the cooperative top-k: each adds one to the row's count and waits
    until it reaches `target` (its programs times the barriers passed so far). The block barrier puts every thread's
    stores before the release; the acquire that sees the target makes the other programs' stores visible (CUTLASS's
    semaphore's order). Only correct when every program of the row is resident at once: `topk` launches the kernel
    as a cooperative grid, which the driver starts only if all of it fits at once. The interpreter runs programs one
    after another, so there the barrier is a launch boundary instead (`_radix_coop_kernel`'s STOP). The wait polls
    with one thread's acquire load (what Triton makes of the atomic add of 0)."""
    if not INTERPRETING:
        tl.debug_barrier()
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
        while tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()


@triton.jit
def _radix_coop_kernel(scores_ptr, out_ptr, hist_ptr, cand_ptr, counts_ptr, T, K, s_row, o_row, CHUNK, P,
                       BLOCK: tl.constexpr, P_BLOCK: tl.constexpr, COMPACT: tl.constexpr, STOP: tl.constexpr,
                       PDL: tl.constexpr):
    """The radix select of `_radix_pass_kernel` and `_radix_write_kernel` in one launch, program (row, 0, chunk).
    For each byte of the order key, every program histograms its chunk into its own slot (one set of slots per byte,
    so a program ahead never overwrites a slot another still reads), waits for the row's other programs
    (`_wait_for_row`), then reads all the row's slots and finds the k-th key's byte itself: no last program
    finishing each byte, no launch between bytes. From the same slots it counts the keys above the k-th key and the
    ties with it in the chunks before its own, which is where its picks go (`_write_picks`). counts[row] counts the
    barrier's arrivals, counts[rows + row] the programs done; the last one done zeroes both for the next launch.
    STOP < 4 (the interpreter): return after writing byte STOP's slot, so that consecutive launches with STOP = 0..4
    compute what the barriers separate on a GPU."""
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2)
    rows = tl.num_programs(0)
    base = scores_ptr + row * s_row
    start, end = c * CHUNK, tl.minimum((c + 1) * CHUNK, T)
    cand = cand_ptr + (row * P + c) * CHUNK
    bins = tl.arange(0, 256)
    kth = tl.zeros([], tl.int64)
    need = tl.zeros([], tl.int64) + K
    n_cand = tl.zeros([], tl.int32)
    above_before = tl.zeros([], tl.int32)          # keys above the k-th in the chunks before this one
    above_all = tl.zeros([], tl.int32)             # and in the row
    ties_before = tl.zeros([], tl.int32)
    ties_all = tl.zeros([], tl.int32)
    for i in range(4):                             # a loop, not unrolled (`_topk_row_kernel`'s note)
        shift = 24 - 8 * i
        if i <= STOP:
            if COMPACT and i >= 2:                     # as `_radix_pass_kernel`: candidates kept in the pass of byte 16
                hist = _candidate_histogram(cand, n_cand, kth, shift, BLOCK)
            else:
                hist, n_kept = _range_histogram(base, start, end, kth, cand, shift, BLOCK, COMPACT and i == 1)
                n_cand = tl.where(i == 1, n_kept, n_cand)
            slots = hist_ptr + (row * 4 + i) * P * 256
            tl.store(slots + c * 256 + bins, hist)
            if i < STOP:
                _wait_for_row(counts_ptr + row, P * (i + 1))
                total = tl.zeros([256], tl.int32)
                before = tl.zeros([256], tl.int32)
                for p0 in range(0, P, P_BLOCK):
                    chunk = p0 + tl.arange(0, P_BLOCK)
                    tile = tl.load(slots + chunk[:, None] * 256 + bins[None, :], mask=(chunk < P)[:, None], other=0,
                                   cache_modifier=".cg")
                    total += tl.sum(tile, 0)
                    before += tl.sum(tl.where((chunk < c)[:, None], tile, 0), 0)
                byte, next_need, kth = _kth_byte(total, need, kth, shift)
                above_before += tl.sum(tl.where(bins > byte, before, 0), 0)
                above_all += tl.sum(tl.where(bins > byte, total, 0), 0)
                ties_before = tl.sum(tl.where(bins == byte, before, 0), 0)     # the last byte's are the ties
                ties_all = tl.sum(tl.where(bins == byte, total, 0), 0)
                need = next_need
    if STOP == 4:
        picked = above_all + tl.minimum(ties_all, need.to(tl.int32))
        out = out_ptr + row * o_row
        _write_picks(base, out, start, end, kth, need, above_before + tl.minimum(ties_before, need.to(tl.int32)),
                     ties_before, BLOCK)
        _fill_unpicked(out, picked, c * BLOCK, K, P * BLOCK, BLOCK)
        if not INTERPRETING:
            tl.debug_barrier()
            done = tl.atomic_add(counts_ptr + rows + row, 1, sem="relaxed", scope="gpu") == P - 1
            if done:        # every program of the row has passed the last barrier: nobody reads the count again
                tl.atomic_xchg(counts_ptr + row, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(counts_ptr + rows + row, 0, sem="relaxed", scope="gpu")


# Rows up to this many entries: one program per row, the row in registers (`_topk_row_kernel`); longer rows: spread
# over chunks (`_radix_coop_kernel`, or a launch per byte: `_radix_pass_kernel`). On an H200 at k = 512, ten calls back to back in one graph
# (one job, docs/performance.md), the register kernel took 10.3 us per call at batch 8 and 32 and 2,048 entries (8K
# context) where the byte-histogram row kernel it replaced took 12.5, 14.8 against 16.6 at 4,096, 19.9 against 25.5
# for 256 rows of 2,048; the chunked form's five launches took 18-20 us at 2,048 entries in an earlier job.
TOPK_ROW_MAX_ENTRIES = 4096
# Its warps: 4 for rows of up to this many entries (CSA's 2,048 at 8K context), else 8. On the H200, alone, 20 calls
# per graph, us at 8 / 32 rows (session 23's ad-hoc jobs 1-2, docs/performance.md): 2,048 entries 9.5-9.7 against
# 10.1-10.3 with 8 warps, 4,096 entries 15.0 / 15.5 against 14.7 / 14.8. Not timed inside the decode step.
TOPK_ROW_FEW_WARPS_MAX = 2048
# The chunked form's launch settings, from an ad-hoc sweep on the H200 (docs/performance.md): entries per step,
# warps, programs per SM, chunk histograms per load where they are summed (the row's last program; cooperative:
# every program). Chunks of more than
# `compact_over_blocks` steps, in rows of several chunks, keep their candidates after the second byte (COMPACT): at
# batch 32 and 262,144 entries (16,384 per chunk) 169-183 us against 252, where chunks of 1-2 steps lost 1-5 us by it.
TOPK_CHUNKED = dict(block=2048, num_warps=4, per_sm=4, p_block=64, compact_over_blocks=2)
# The cooperative form (`_radix_coop_kernel`: one launch, the row's chunks waiting for each other between bytes):
# at most `per_sm` programs per SM, so that every program of a launch can be resident at once, which its barriers
# need, and by default only where that makes chunks of at most `max_steps` steps, at most `max_chunks` per row (what
# was measured: 16 at batch 8, 8 at 32): longer chunks (a 1M context's rows), more of them (every program reads all
# the row's histograms per byte) or more rows (a prefill chunk's) take the launch per byte, over more programs. Steps, warps, histograms per load
# and candidates as the launch per byte's. On the H200, 20 calls per graph, us per call at k = 512 (session 24's
# job 2, docs/performance.md), launch per byte against cooperative at 1 / 2 programs per SM: 8 rows of 32,768
# entries 29.4-29.7 against 22.2-22.3 / 22.1-22.3; 32 rows 50.6-50.8 against 55.8-56.0 / 41.1 (chunks of 4,096);
# 8 rows of 262,144 73.6-73.9 against 102.2-102.7 / 88.9-89.1; 32 rows 202.4-202.5 against 379.8 / 281.4-282.3.
# In the CSA decode step per token at 128K (job 5, the scores by parts): 169.5 against 175.3 us at batch 8, 272.0
# against 276.2 at batch 32.
TOPK_COOPERATIVE = dict(per_sm=2, max_steps=2, max_chunks=16)


def topk(scores: torch.Tensor, k: int, chunk: int | None = None, block: int | None = None,
         cooperative: bool | None = None) -> torch.Tensor:
    """Indices of the `k` largest of each row of float32 `scores` [..., T] as int32 [..., k], in index order, -1
    after the last one; -inf scores are never picked (their slots are -1), and among entries tied with the k-th
    largest score the lowest indices are kept (the `kernels.indexer_topk` contract).

    Without `chunk`, a row of at most TOPK_ROW_MAX_ENTRIES is one program holding it in registers (one launch;
    `block` does not apply).
    Longer rows (or an explicit `chunk`: entries per program, rounded up to whole steps of `block` entries) are radix
    select over the scores' order keys, one byte at a time from the top, spread over the row's chunks, then the picks
    written. Where TOPK_COOPERATIVE["per_sm"] programs per SM cut the rows into at most its `max_chunks` chunks of at
    most `max_steps` steps (decode up to 128K context; or `cooperative`), that is one launch whose chunks wait for
    each other between bytes (`_radix_coop_kernel`; more programs than TOPK_COOPERATIVE["per_sm"] per SM raise
    ValueError, and the driver refuses a cooperative grid that does not fit at once). Otherwise (longer rows,
    prefill's many rows; or `cooperative=False`) a launch per byte, each spread over about TOPK_CHUNKED["per_sm"]
    programs per SM (rows that fill the GPU by themselves are one chunk each), whose last program to finish finds
    the byte, then a launch that writes the picks (five launches, whatever the row length: the 256K-entry rows of a
    1M context took torch.topk 98-159 us at batch 8-32, which also keeps ties in its own order)."""
    rows, T = scores.shape[:-1].numel(), scores.size(-1)
    if rows == 0 or T == 0:                         # nothing to pick (a cache shorter than one block has no keys)
        return torch.full((*scores.shape[:-1], k), -1, device=scores.device, dtype=torch.int32)
    flat = scores.float().reshape(rows, T).contiguous()
    dev = flat.device
    out = torch.empty(rows, k, device=dev, dtype=torch.int32)
    if chunk is None and T <= TOPK_ROW_MAX_ENTRIES:
        row_block = max(16, triton.next_power_of_2(T))
        _topk_row_kernel[(rows,)](flat, out, T, k, flat.stride(0), out.stride(0), BLOCK=row_block,
                                  num_warps=4 if row_block <= TOPK_ROW_FEW_WARPS_MAX else 8, **launch_options(dev))
        return out.view(*scores.shape[:-1], k)
    cfg = TOPK_CHUNKED
    step = block or cfg["block"]
    whole_steps = lambda n: triton.cdiv(n, step) * step                                  # noqa: E731
    resident = TOPK_COOPERATIVE["per_sm"] * sm_count(dev)
    suits = lambda chunk: (chunk <= TOPK_COOPERATIVE["max_steps"] * step                  # noqa: E731
                           and triton.cdiv(T, chunk) <= TOPK_COOPERATIVE["max_chunks"])
    if chunk is None:
        # the cooperative form's chunks: the rows over the programs that stay resident (none if the rows are more)
        coop_chunk = whole_steps(triton.cdiv(T, resident // rows)) if rows <= resident else None
        if cooperative is None:
            cooperative = coop_chunk is not None and suits(coop_chunk)
        chunk = (coop_chunk if cooperative and coop_chunk is not None
                 else triton.cdiv(T, triton.cdiv(cfg["per_sm"] * sm_count(dev), rows)))
    chunk = whole_steps(chunk)
    P = triton.cdiv(T, chunk)
    # a program waiting for one that cannot start would wait forever (the interpreter's barriers end launches)
    fits = rows * P <= resident or bool(INTERPRETING)
    if cooperative is None:                         # an explicit chunk
        cooperative = fits and suits(chunk)
    if cooperative and not fits:
        raise ValueError(f"topk: {rows} rows of {P} chunks are more programs than the {resident} the cooperative "
                         f"top-k may keep resident (TOPK_COOPERATIVE['per_sm'] per SM); give larger chunks")
    # a row in one chunk (rows that fill the GPU by themselves) keeps no candidates: they would take as much memory
    # as the scores (2 GiB for a 16,384-query prefill chunk at 128K context)
    compact = P > 1 and chunk > cfg["compact_over_blocks"] * step
    cand = torch.empty(rows, P * chunk if compact else 0, device=dev, dtype=torch.float32)
    p_block = min(cfg["p_block"], triton.next_power_of_2(P))
    if cooperative:
        hist = torch.empty(rows, 4, P, 256, device=dev, dtype=torch.int32)
        counts = arrival_tickets(dev, 2 * rows, pool="barriers")
        # on a GPU a cooperative launch: the driver refuses a grid that cannot be resident at once rather than let it
        # wait forever; the interpreter runs one program after another, so there each barrier ends a launch (STOP)
        options = {**launch_options(dev), **({} if INTERPRETING else {"launch_cooperative_grid": True})}
        for stop in range(5) if INTERPRETING else (4,):
            _radix_coop_kernel[(rows, 1, P)](flat, out, hist, cand, counts, T, k, flat.stride(0), out.stride(0), chunk,
                                             P, BLOCK=step, P_BLOCK=p_block, COMPACT=compact, STOP=stop,
                                             num_warps=cfg["num_warps"], **options)
        return out.view(*scores.shape[:-1], k)
    hist = torch.empty(rows, P, 256, device=dev, dtype=torch.int32)
    above, sel_off, tie_off = (torch.empty(rows, P, device=dev, dtype=torch.int32) for _ in range(3))
    state = torch.empty(rows, 3, device=dev, dtype=torch.int64)
    cand_n = torch.empty(rows, P if compact else 0, device=dev, dtype=torch.int32)
    tickets = arrival_tickets(dev, rows)
    for shift in (24, 16, 8, 0):
        _radix_pass_kernel[(rows, 1, P)](flat, hist, above, sel_off, tie_off, state, tickets, cand, cand_n, T, k,
                                         flat.stride(0), chunk, P, SHIFT=shift, BLOCK=step, P_BLOCK=p_block,
                                         COMPACT=compact, num_warps=cfg["num_warps"], **launch_options(dev))
    _radix_write_kernel[(rows, 1, P)](flat, out, sel_off, tie_off, state, T, k, flat.stride(0), out.stride(0), chunk,
                                      P, BLOCK=step, num_warps=cfg["num_warps"], **launch_options(dev))
    return out.view(*scores.shape[:-1], k)

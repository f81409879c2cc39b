"""Triton kernel for the compressor at decode (`model.kernels.compress_blocks` with one token per sequence).

The reference stages every call: the carried state joined with the chunk in a new buffer, every block of it
pooled, the state gathered back. At a decode step that reads and writes the whole state every time (V4-Flash's
HCA layers carry 128 rows of 512 float32 kv and score channels, 512 KiB per sequence, 16 MiB at batch 32) although
one token changes one row and completes a block once every `ratio` steps. Here a program per (sequence, block of
channels) writes the token's row in place and, only where the token completes its block, reads that block, pools
it and advances the state: with overlap (ratio 4) the block becomes the previous one and the new current block
starts empty; without, the state starts empty. Same pooling as the reference (float32 softmax over the block's
slots, then the weighted sum), added up in another order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend.backends.triton_common import after_previous_kernel, launch_options

# Values of each [rows, channels] tile a program loads when its token completes a block (kv and score, and with
# overlap the previous block's and the moved half's too): 32 channels x 128 rows for HCA, 32 per thread of the 4
# warps (NUM_WARPS), sized to keep the tiles in registers. Not tuned: a block completes once every `ratio` steps.
TILE = 4096
NUM_WARPS = 4


@triton.jit
def _compress_decode_kernel(kv_ptr, score_ptr, start_ptr, n_valid_ptr, state_kv_ptr, state_score_ptr, ids_ptr,
                            complete_ptr, out_ptr, s_kv, s_score, s_state, d, R: tl.constexpr, R_P2: tl.constexpr,
                            OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Program (b, channel block). State of sequence b: [(1 + OVERLAP) * R rows, W] at state + b * s_state, W =
    (1 + OVERLAP) * d; the block being filled is at rows OVERLAP * R on. Channel c pools into this block's entry
    from its own channel c + OVERLAP * d and, with overlap, from channel c of the previous block (rows 0 .. R-1).
    Programs (b, 0) also write the ids and complete flags of the two blocks (`model.kernels.chunk_blocks`)."""
    after_previous_kernel(PDL)
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < d
    width = (1 + OVERLAP) * d
    pos = tl.load(start_ptr + b)
    valid = tl.load(n_valid_ptr + b) > 0
    at = pos % R
    completes = valid & (at == R - 1)
    if tl.program_id(1) == 0:               # the token's block and the next one, which one token never completes
        two = tl.arange(0, 2)
        tl.store(ids_ptr + b * 2 + two, pos // R + two)
        tl.store(complete_ptr + b * 2 + two, ((two == 0) & completes).to(tl.uint8))
    own = c + OVERLAP * d                   # the token's channels that pool into its own block's entry
    new_kv = tl.load(kv_ptr + b * s_kv + own, mask=in_c)
    new_score = tl.load(score_ptr + b * s_score + own, mask=in_c)
    if OVERLAP:                             # and those that pool into the next block's entry
        next_kv = tl.load(kv_ptr + b * s_kv + c, mask=in_c)
        next_score = tl.load(score_ptr + b * s_score + c, mask=in_c)
    state_kv = state_kv_ptr + b * s_state
    state_score = state_score_ptr + b * s_state
    out = out_ptr + b * 2 * d               # [2, d]: the token's block and the next (zeros)
    if completes:                           # pool the token's block, then advance the state
        r = tl.arange(0, R_P2)
        tile = (r < R)[:, None] & in_c[None, :]
        is_new = (r == at)[:, None]
        cur = (OVERLAP * R + r)[:, None] * width + own[None, :]
        kv = tl.where(is_new, new_kv[None, :], tl.load(state_kv + cur, mask=tile, other=0.0))
        score = tl.where(is_new, new_score[None, :], tl.load(state_score + cur, mask=tile, other=float("-inf")))
        if OVERLAP:     # the previous block's first half pools into this entry too; this block's moves to rows 0..
            prev = r[:, None] * width + c[None, :]
            kv_prev = tl.load(state_kv + prev, mask=tile, other=0.0)
            score_prev = tl.load(state_score + prev, mask=tile, other=float("-inf"))
            top = tl.maximum(tl.max(score, 0), tl.max(score_prev, 0))
            e = tl.exp(score - top[None, :])
            e_prev = tl.exp(score_prev - top[None, :])
            total = tl.sum(e, 0) + tl.sum(e_prev, 0)
            pooled = tl.sum(kv * (e / total[None, :]), 0) + tl.sum(kv_prev * (e_prev / total[None, :]), 0)
            lo = (R + r)[:, None] * width + c[None, :]
            kv_lo = tl.where(is_new, next_kv[None, :], tl.load(state_kv + lo, mask=tile, other=0.0))
            score_lo = tl.where(is_new, next_score[None, :], tl.load(state_score + lo, mask=tile, other=float("-inf")))
        else:
            e = tl.exp(score - tl.max(score, 0)[None, :])
            pooled = tl.sum(kv * (e / tl.sum(e, 0)[None, :]), 0)
        tl.debug_barrier()              # every thread's loads of the state before any store to it
        if OVERLAP:
            tl.store(state_kv + prev, kv_lo, mask=tile)
            tl.store(state_score + prev, score_lo, mask=tile)
            tl.store(state_kv + prev + d, kv, mask=tile)
            tl.store(state_score + prev + d, score, mask=tile)
            tl.store(state_kv + lo, tl.zeros_like(kv), mask=tile)
            tl.store(state_score + lo, tl.full([R_P2, BLOCK_C], float("-inf"), tl.float32), mask=tile)
        tl.store(state_kv + cur, tl.zeros_like(kv), mask=tile)          # the token's block starts empty
        tl.store(state_score + cur, tl.full([R_P2, BLOCK_C], float("-inf"), tl.float32), mask=tile)
        tl.store(out + c, pooled, mask=in_c)
    else:
        row = (OVERLAP * R + at) * width
        tl.store(state_kv + row + own, new_kv, mask=in_c & valid)
        tl.store(state_score + row + own, new_score, mask=in_c & valid)
        if OVERLAP:
            tl.store(state_kv + row + c, next_kv, mask=in_c & valid)
            tl.store(state_score + row + c, next_score, mask=in_c & valid)
        tl.store(out + c, tl.zeros_like(new_kv), mask=in_c)
    tl.store(out + d + c, tl.zeros_like(new_kv), mask=in_c)


def block_channels(d: int, ratio: int) -> int:
    """Channels per program of `_compress_decode_kernel` for entries of `d` channels pooled over `ratio` rows: as
    many as keep each tile within TILE values (at least 16, at most d rounded up to a power of two)."""
    return min(triton.next_power_of_2(d), max(16, TILE // triton.next_power_of_2(ratio)))


def compress_decode(kv: torch.Tensor, score: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor,
                    state_kv: torch.Tensor, state_score: torch.Tensor, ratio: int,
                    overlap: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`model.kernels.compress_blocks` for a decode step: (ids int64 [B, 2], complete bool [B, 2], pooled entries
    float32 [B, 2, d]; the second block is never complete at one token), updating the float32 state in place.
    kv, score: float32 [B, 1, W] (row strides free, unit stride in W: views of a joint projection do); state rows
    contiguous ([B, rows, W] with unit stride in W and W between rows)."""
    b, s, width = kv.shape
    if s != 1:
        raise ValueError(f"compress_decode: one token per sequence, got kv of shape {tuple(kv.shape)}")
    d = width // (2 if overlap else 1)
    new_kv, new_score = (t[:, 0] if t.stride(-1) == 1 else t[:, 0].contiguous() for t in (kv, score))
    assert state_kv.stride()[1:] == (width, 1) and state_score.stride() == state_kv.stride(), "state layout"
    ids = torch.empty(b, 2, dtype=torch.int64, device=kv.device)
    complete = torch.empty(b, 2, dtype=torch.bool, device=kv.device)
    out = torch.empty(b, 2, d, dtype=torch.float32, device=kv.device)
    block_c = block_channels(d, ratio)
    _compress_decode_kernel[(b, triton.cdiv(d, block_c))](
        new_kv, new_score, start, n_valid, state_kv, state_score, ids, complete.view(torch.uint8), out,
        new_kv.stride(0), new_score.stride(0), state_kv.stride(0), d, R=ratio, R_P2=triton.next_power_of_2(ratio),
        OVERLAP=int(overlap), BLOCK_C=block_c, num_warps=NUM_WARPS, **launch_options(kv.device))
    return ids, complete, out

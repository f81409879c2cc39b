"""Triton kernels for quantised weights picked per row: the static MoE path and decode-sized projections.

Contract (`model.kernels.expert_matmul`, fmt "fp4" / "fp8"): y[n] = dequant(weight[expert_idx[n]]) @ x[n]. The
reference gathers and dequantises every selection's weight into x's dtype first ([N, out, in], ~10 GB per layer at
batch 32 on V4-Flash); these kernels read the stored bytes (packed e2m1 + ue8m0, or e4m3 + ue8m0 per 128 x 128) and
decode them in registers next to the multiply. Two kernels per format, picked by `expert_matmul`:

- per selection (`expert_matmul_fp4` / `_fp8`): a GEMV per (block of BLOCK_OUT output rows, selection). Each
  selection decodes its expert's tile again (the second one mostly from L2, as programs run in the order of
  `argsort(expert_idx)`); no tensor cores. Best when each expert has about one row (batch-1 decode).
- grouped (`grouped_matmul_fp4` / `_fp8`): selections sorted by expert; a program per (block of output rows,
  expert) decodes the expert's tile ONCE per chunk of BLOCK_M of its rows and multiplies it with them through
  `tl.dot` (tensor cores). Best once experts have several rows, and for a projection (one "expert", every row).

A grid of few programs (a projection with few output blocks) is split over the inputs too (split-K): each split
writes float32 partial sums, and the last program to finish an output block adds them up in split order and
writes y (`triton_common.store_rows`: `last_to_arrive`, then `sum_splits`), so a split call is still one launch and
its result deterministic.

The fp4 per-selection walk reads a [BLOCK_OUT rows, BLOCK_IN / 8 int32 words of 8 codes] tile per step. Without
tensor cores its speed is instructions per byte. Four codes at a time become e4m3 bytes (two shifts, two masks) that
the hardware widens to float16 pairs (`_e2m1_words_to_f16`, sm_89+). On bf16 / fp16 rows x is scaled by one power of
two per program into float16's range (`_f16_range`) and packed once per word, and each pair of codes meets it in one
packed float16 multiply-add (`fma.rn.f16x2`): a word's four products per half are summed in float16, everything after
in float32. That is about 8 instructions per packed byte on sm_90 at the experts' 32 x 256 tile (7.25 at 32 x 512;
`scripts/kernel_sass.py`) against 10.6 for the walk before, in float32, whose decode built each code's float16 bits
with two shifts and two masks per pair. The price: an error of at most 2^-9 of the summed magnitudes of a row's
products (four float16 roundings per word); relative to the reference path's output about 1e-3 at V4-Flash shapes
(`scripts/bench_moe.py`'s rel err, ~5e-5 before), the size of one bf16 rounding of the output. float32 rows keep
float32 products and sums.

Launch shapes depend only on tensor shapes and there is no host sync, so both are CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend.backends.triton_common import (INTERPRETING, after_previous_kernel, arrival_tickets, dot_precision,
                                           last_to_arrive, launch_options, sm_count, store_part, store_rows,
                                           sum_splits)

FP4_GROUP = 32          # inputs per ue8m0 scale (model.quant.FP4_BLOCK)
X_SCAN = tl.constexpr(1024)      # inputs per step of the fp4 walk's scan for max |x|


@triton.jit
def _e2m1_times_2_pow_minus_14(code):
    """e2m1 codes 0..15 (int32) -> value * 2^-14 in float32, in four integer ops and one exact conversion.

    e2m1 (sign, 2 exponent bits with bias 1, 1 mantissa bit) sits inside float16 (5 exponent bits, bias 15):
    sign bit 3 -> bit 15, the 3 magnitude bits -> bits 9..11 (top of the exponent-low / mantissa fields) gives the
    float16 of value * 2^-14, subnormal codes 0 / 1 (0, .5) included; float16 subnormals are never flushed.
    The kernel multiplies its sums by 2^14 once, at the end."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e8m0_value(byte):
    """ue8m0 bytes (int32) -> 2^(e - 127) in float32 (e = 0, 2^-127, is a subnormal: built from its bits)."""
    return tl.where(byte == 0, 1 << 22, byte << 23).to(tl.float32, bitcast=True)


@triton.jit
def _selection(order_ptr, idx_ptr, OUT, IN, K_SPLIT, BLOCK_OUT: tl.constexpr):
    """A per-selection program's work: its selection (programs visit them in `order`; None: in row order), that
    selection's expert (`idx` None: one weight), its block of output rows (and which exist), and its range of inputs,
    empty for a negative expert id (another rank's selection reads nothing and its row stays 0)."""
    if order_ptr is None:
        sel = tl.program_id(1).to(tl.int64)
    else:
        sel = tl.load(order_ptr + tl.program_id(1)).to(tl.int64)
    if idx_ptr is None:
        expert = tl.full([], 0, tl.int64)
    else:
        expert = tl.load(idx_ptr + sel).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.where(expert < 0, k_lo, tl.minimum(IN, k_lo + K_SPLIT))
    return sel, tl.maximum(expert, 0), rows, rows < OUT, k_lo, k_hi


@triton.jit
def _packed_fma(a, b, c):
    """a * b + c on int32 words of two float16 each, rounded once per half (`fma.rn.f16x2`); emulated in float32
    (exact products, the sum rounded to float16) under the interpreter."""
    if INTERPRETING:
        lo = _f16_half(a, False) * _f16_half(b, False) + _f16_half(c, False)
        hi = _f16_half(a, True) * _f16_half(b, True) + _f16_half(c, True)
        return _f16_pack(lo, hi)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _f16_half(v, HIGH: tl.constexpr):
    """One float16 half of int32 words (bits 0..15, or 16..31 if HIGH), widened to float32."""
    if HIGH:
        v = v >> 16
    return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_pack(lo, hi):
    """Two float32 tensors rounded to float16 into the halves of int32 words (lo in bits 0..15)."""
    if INTERPRETING:
        low = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return low | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
    else:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _e4m3_bytes_to_f16(v):
    """int32 words of four e4m3 bytes -> (bytes 0, 1; bytes 2, 3) as float16 pairs, two conversions of two bytes
    each (`cvt.rn.f16x2.e4m3x2`, sm_89+)."""
    if INTERPRETING:
        return (_f16_pack(_e4m3_byte(v, 0), _e4m3_byte(v, 1)), _f16_pack(_e4m3_byte(v, 2), _e4m3_byte(v, 3)))
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [v], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _e4m3_byte(v, I: tl.constexpr):
    """Byte I of int32 words read as e4m3, in float32: the interpreter's stand-in for the hardware conversion."""
    return ((v >> (8 * I)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_words_to_f16(words):
    """int32 words of 8 packed e2m1 codes (code i in bits 4i..4i+3: m, e0, e1, sign) -> four float16 pairs holding
    codes (0, 2), (4, 6), (1, 3), (5, 7), each value * 2^-6. Every code becomes an e4m3 byte (sign to bit 7, e1 e0 m
    to bits 4..2: e2m1's value times 2^-6 exactly, subnormal codes included), four bytes per two shifts and two
    masks, and the hardware converts e4m3 pairs to float16: about half the integer work of building float16 bits
    from each code."""
    even = ((words << 2) & 0x1C1C1C1C) | ((words << 4) & -0x7F7F7F80)     # codes 0, 2, 4, 6; -0x7F7F7F80: 0x80808080
    odd = ((words >> 2) & 0x1C1C1C1C) | (words & -0x7F7F7F80)            # codes 1, 3, 5, 7
    w02, w46 = _e4m3_bytes_to_f16(even)
    w13, w57 = _e4m3_bytes_to_f16(odd)
    return w02, w46, w13, w57


@triton.jit
def _x_by_word(x_row, word, ok, WORDS: tl.constexpr):
    """x at inputs 8w .. 8w + 7 of the words w (a [WORDS] tensor), as eight float32 tensors shaped like `word`. A bf16
    row is read as int32 pairs and widened by moving bits (a bf16 is the top half of its float32)."""
    if x_row.dtype.element_ty == tl.bfloat16:
        pairs = tl.load(x_row.to(tl.pointer_type(tl.int32)) + word[:, None] * 4 + tl.arange(0, 4)[None, :],
                        mask=ok[:, None], other=0)                           # pair p: inputs 2p, 2p + 1
        even = (pairs << 16).to(tl.float32, bitcast=True)
        odd = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_row + word[:, None] * 8 + tl.arange(0, 8)[None, :], mask=ok[:, None], other=0.0)
        even, odd = tl.split(tl.reshape(x.to(tl.float32), [WORDS, 4, 2]))
    x04, x26 = tl.split(tl.reshape(even, [WORDS, 2, 2]))
    x15, x37 = tl.split(tl.reshape(odd, [WORDS, 2, 2]))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _f16_range(x_row, k_lo, k_hi):
    """(up, down): powers of two that take x[k_lo:k_hi] into float16's range, max |x| * up in [2^13, 2^14), and
    down = 2^6 / up undoes it and the decoded codes' 2^-6 (products of at most 6 * 2^-6 * 2^14 = 1536, sums of
    four of them stay far below float16's 65504; exponents clamped so both stay normal floats)."""
    big = tl.zeros([X_SCAN], tl.float32)
    for c0 in range(k_lo, k_hi, X_SCAN):
        c = c0 + tl.arange(0, X_SCAN)
        big = tl.maximum(big, tl.abs(tl.load(x_row + c, mask=c < k_hi, other=0.0).to(tl.float32)))
    biased = (tl.max(big, axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF      # floor(log2 max |x|) + 127
    shift = tl.minimum(tl.maximum(140 - biased, -113), 127)
    return ((127 + shift) << 23).to(tl.float32, bitcast=True), ((133 - shift) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_expert_matmul_kernel(
    x_ptr, w_ptr, s_ptr, idx_ptr, order_ptr, y_ptr, part_ptr, tickets_ptr,
    OUT, IN, K_SPLIT, sx, sw_e, sw_o, ss_e, ss_o, sy, sy_split,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """w_ptr: the packed codes as int32 words (strides in words), 4 per scale group of 32 inputs. The tile is
    [BLOCK_OUT rows, BLOCK_IN / 8 words]; each word's 8 products are summed in float16 pairs (16-bit x) or float32
    (float32 x), its group's 4 words in float32 and scaled once."""
    after_previous_kernel(PDL)
    GROUPS: tl.constexpr = BLOCK_IN // 32
    WORDS: tl.constexpr = BLOCK_IN // 8
    EXACT: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    sel, expert, rows, row_ok, k_lo, k_hi = _selection(order_ptr, idx_ptr, OUT, IN, K_SPLIT, BLOCK_OUT)
    w_rows = w_ptr + expert * sw_e + rows[:, None].to(tl.int64) * sw_o
    s_rows = s_ptr + expert * ss_e + rows[:, None].to(tl.int64) * ss_o
    x_row = x_ptr + sel * sx
    if EXACT:
        down = 64.0                                               # 2^6: see _e2m1_words_to_f16
    else:
        up, down = _f16_range(x_row, k_lo, k_hi)
    acc = tl.zeros([BLOCK_OUT, GROUPS], tl.float32)               # summed over groups once, after the loop
    for k0 in range(k_lo, k_hi, BLOCK_IN):
        word = k0 // 8 + tl.arange(0, WORDS)
        word_ok = word < IN // 8                                  # IN is a multiple of 32
        words = tl.load(w_rows + word[None, :], mask=row_ok[:, None] & word_ok[None, :], other=0)
        w02, w46, w13, w57 = _e2m1_words_to_f16(words)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_by_word(x_row, word, word_ok, WORDS)
        if EXACT:       # each half widened to float32, one float32 multiply-add per code
            part = _f16_half(w02, False) * x0[None, :]
            part += _f16_half(w02, True) * x2[None, :]
            part += _f16_half(w46, False) * x4[None, :]
            part += _f16_half(w46, True) * x6[None, :]
            part += _f16_half(w13, False) * x1[None, :]
            part += _f16_half(w13, True) * x3[None, :]
            part += _f16_half(w57, False) * x5[None, :]
            part += _f16_half(w57, True) * x7[None, :]
        else:           # x scaled into float16 once per word, one packed multiply-add per two codes
            h = _packed_fma(w02, _f16_pack(x0 * up, x2 * up)[None, :], tl.zeros([BLOCK_OUT, WORDS], tl.int32))
            h = _packed_fma(w46, _f16_pack(x4 * up, x6 * up)[None, :], h)
            h = _packed_fma(w13, _f16_pack(x1 * up, x3 * up)[None, :], h)
            h = _packed_fma(w57, _f16_pack(x5 * up, x7 * up)[None, :], h)
            part = _f16_half(h, False) + _f16_half(h, True)
        group = k0 // 32 + tl.arange(0, GROUPS)
        scale = tl.load(s_rows + group[None, :], mask=row_ok[:, None] & (group < IN // 32)[None, :], other=0)
        acc += tl.sum(tl.reshape(part, [BLOCK_OUT, GROUPS, 4]), axis=2) * _e8m0_value(scale.to(tl.int32))
    y = tl.sum(acc, axis=1) * down
    store_rows(y, y_ptr, part_ptr, tickets_ptr, sel * sy + rows, row_ok, sy_split, SPLITS)


@triton.jit
def _unpacked_expert_matmul_kernel(
    x_ptr, w_ptr, s_ptr, idx_ptr, order_ptr, y_ptr, part_ptr, tickets_ptr,
    OUT, IN, K_SPLIT, sx, sw_e, sw_o, ss_e, ss_o, sy, sy_split,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """Same walk for weights of one stored element each: FP8 e4m3 with one ue8m0 scale per 128 x 128 block
    (BLOCK_IN is at most 128 and divides it, so each chunk of a row has one scale), or plain bf16 / float32 weights
    without scales (`s_ptr` None: `f32_gemv`)."""
    after_previous_kernel(PDL)
    sel, expert, rows, row_ok, k_lo, k_hi = _selection(order_ptr, idx_ptr, OUT, IN, K_SPLIT, BLOCK_OUT)
    cols = tl.arange(0, BLOCK_IN)
    w_rows = w_ptr + expert * sw_e + rows[:, None].to(tl.int64) * sw_o
    x_row = x_ptr + sel * sx
    acc = tl.zeros([BLOCK_OUT], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_IN):
        col = k0 + cols
        col_ok = col < IN
        x = tl.load(x_row + col, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + col[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if s_ptr is None:
            acc += tl.sum(w * x[None, :], axis=1)
        else:
            s_rows = s_ptr + expert * ss_e + (rows // 128).to(tl.int64) * ss_o
            scale = tl.load(s_rows + k0 // 128, mask=row_ok, other=0).to(tl.int32)
            acc += tl.sum(w * x[None, :], axis=1) * _e8m0_value(scale)
    store_rows(acc, y_ptr, part_ptr, tickets_ptr, sel * sy + rows, row_ok, sy_split, SPLITS)


def _split_out(x: torch.Tensor, n_out: int, n_in: int, block_in: int, split_k: int, programs: int,
               out_dtype: torch.dtype | None = None) -> tuple:
    """(splits, inputs per split, y, partials, tickets): whole input blocks per split; with several, float32
    partial sums [splits, N, out] that the kernel's last split per block adds into y (in `out_dtype`, default
    x's). Without a split, y stands in for the two unused buffers."""
    k_split = triton.cdiv(triton.cdiv(n_in, split_k), block_in) * block_in
    split_k = triton.cdiv(n_in, k_split)
    y = torch.empty(x.size(0), n_out, dtype=out_dtype or x.dtype, device=x.device)
    if split_k == 1:
        return 1, k_split, y, y, y
    part = torch.empty(split_k, x.size(0), n_out, dtype=torch.float32, device=x.device)
    return split_k, k_split, y, part, arrival_tickets(x.device, programs)


def _operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> tuple:
    """Rows with unit-stride inputs, each row 16-byte aligned (the fp4 kernel reads bf16 rows as int32 pairs), and
    the scales seen as bytes (None: no scales), as both launchers pass them. Rows keep their own stride: a token's
    input broadcast to its k experts (row stride 0) is read in place, not copied k times first."""
    s = None if scale is None else scale.view(torch.uint8)
    assert weight.stride(-1) == 1 and (s is None or s.stride(-1) == 1)
    if x.stride(-1) != 1 or (x.stride(0) * x.element_size()) % 16:
        x = x.contiguous()
    return (x if x.data_ptr() % 16 == 0 else x.clone()), s


def _launch(kernel, x, weight, scale, expert_idx, block_out, block_in, num_warps, sort, split_k,
            order=None, out_dtype=None) -> torch.Tensor:
    n, n_out, n_in = x.size(0), weight.size(1), x.size(1)
    if n == 0:
        return x.new_empty(0, n_out, dtype=out_dtype or x.dtype)
    x, s = _operands(x, weight, scale)
    # selections of one expert back to back (L2 reuse); one weight (a projection), or unsorted: in row order
    if order is None and sort and weight.size(0) > 1:
        order = torch.argsort(expert_idx.int())
    grid = (triton.cdiv(n_out, block_out), n)
    if split_k is None:
        split_k = split_k_for(grid[0] * grid[1], n_in, block_in, x.device)
    split_k, k_split, y, part, tickets = _split_out(x, n_out, n_in, block_in, split_k, grid[0] * grid[1], out_dtype)
    s_strides = (0, 0) if s is None else (s.stride(0), s.stride(1))
    kernel[grid + (split_k,)](x, weight, s, expert_idx, order, y, part, tickets, n_out, n_in, k_split, x.stride(0),
                              weight.stride(0), weight.stride(1), *s_strides, y.stride(0),
                              part.stride(0) if split_k > 1 else 0,
                              BLOCK_OUT=block_out, BLOCK_IN=block_in, SPLITS=split_k, num_warps=num_warps,
                              **launch_options(x.device))
    return y


def expert_matmul_fp4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_idx: torch.Tensor,
                      block_out: int = 32, block_in: int = 512, num_warps: int = 4,
                      sort: bool = True, split_k: int | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in]; weight [E, out, in/2] packed e2m1 (int8 / uint8); scale [E, out, in/32] float8_e8m0fnu (or its
    bytes); expert_idx [N] -> [N, out] in x's dtype. `block_in` is a power of two >= 32; `split_k` (programs per
    output block, each over a share of the inputs) None: `split_k_for`; `order`: the visiting order of the
    selections if the caller has it (`group_experts`), else sorted here (`sort`)."""
    assert weight.size(2) * 2 == x.size(1) and block_in >= FP4_GROUP
    return _launch(_fp4_expert_matmul_kernel, x, weight.view(torch.int32), scale, expert_idx, block_out, block_in,
                   num_warps, sort, split_k, order)


def expert_matmul_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_idx: torch.Tensor,
                      block_out: int = 32, block_in: int = 128, num_warps: int = 4,
                      sort: bool = True, split_k: int | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in]; weight [E, out, in] float8_e4m3fn; scale [E, ceil(out/128), ceil(in/128)] float8_e8m0fnu;
    expert_idx [N] -> [N, out] in x's dtype. `block_in` is a power of two dividing 128; `split_k`, `order` as for
    fp4."""
    assert weight.size(2) == x.size(1) and 128 % block_in == 0
    return _launch(_unpacked_expert_matmul_kernel, x, weight, scale, expert_idx, block_out, block_in, num_warps,
                   sort, split_k, order)


def f32_gemv(x: torch.Tensor, weight: torch.Tensor, block_out: int = 64, block_in: int = 128, num_warps: int = 8,
             split_k: int | None = None) -> torch.Tensor:
    """`model.kernels.f32_linear` as the per-selection walk: x [N, in] times a plain weight [out, in] (bf16, no
    scales), float32 sums and output [N, out]. It reads the weight once per row, so it is for a row or two (batch-1
    decode), where it is one launch with its input split reduced inside (cuBLAS's small-M GEMMs split K and add
    the parts in a second launch)."""
    assert weight.size(1) == x.size(1)
    return _launch(_unpacked_expert_matmul_kernel, x, weight.unsqueeze(0), None, None, block_out, block_in,
                   num_warps, False, split_k, out_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ grouped kernels
@triton.jit
def _chunk(order_ptr, first, m0, count, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M of an expert's `count` (those that exist), as selections of x and y."""
    m_ok = m0 + tl.arange(0, BLOCK_M) < count
    return tl.load(order_ptr + first + m0 + tl.arange(0, BLOCK_M), mask=m_ok, other=0).to(tl.int64), m_ok


@triton.jit
def _sum_expert_splits(part_ptr, y_ptr, tickets_ptr, order_ptr, first, count, rows, row_ok, sy, sy_split,
                       BLOCK_M: tl.constexpr, SPLITS: tl.constexpr):
    """A grouped program's split-K end: the last split of this (output block, expert) adds up every row chunk."""
    if last_to_arrive(tickets_ptr, SPLITS):
        for m0 in range(0, count, BLOCK_M):
            sel, m_ok = _chunk(order_ptr, first, m0, count, BLOCK_M)
            sum_splits(part_ptr, y_ptr, sel[None, :] * sy + rows[:, None], row_ok[:, None] & m_ok[None, :],
                        sy_split, SPLITS)


@triton.jit
def _fp4_grouped_kernel(
    x_ptr, w_ptr, s_ptr, order_ptr, starts_ptr, counts_ptr, experts_ptr, y_ptr, part_ptr, tickets_ptr,
    OUT, IN, K_SPLIT, sx, sw_e, sw_o, ss_e, ss_o, sy, sy_split,
    BLOCK_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, PRECISION: tl.constexpr,
    SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """Program (block of output rows, expert slot): the expert's [BLOCK_OUT, BLOCK_IN] tile is decoded into x's
    dtype (exact: an e2m1 value times a power of two), low and high nibbles interleaved back into input order
    (`tl.join`), and meets BLOCK_M of the expert's rows in one `tl.dot`."""
    after_previous_kernel(PDL)
    GROUPS: tl.constexpr = BLOCK_IN // 32
    expert = tl.load(experts_ptr + tl.program_id(1)).to(tl.int64)
    count = tl.load(counts_ptr + expert)                  # 0: the loop over rows below runs no iteration
    first = tl.load(starts_ptr + expert)
    k_first = tl.program_id(2) * K_SPLIT                  # this program's share of the inputs: K_SPLIT of them
    rows = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows < OUT
    g = tl.arange(0, GROUPS)
    cols = tl.arange(0, BLOCK_IN)
    w_rows = w_ptr + expert * sw_e + rows[:, None, None].to(tl.int64) * sw_o
    s_rows = s_ptr + expert * ss_e + rows[:, None].to(tl.int64) * ss_o
    dot_type = x_ptr.dtype.element_ty
    for m0 in range(0, count, BLOCK_M):
        sel, m_ok = _chunk(order_ptr, first, m0, count, BLOCK_M)
        x_cols = x_ptr + sel[None, :] * sx                                   # [1, BLOCK_M]: x seen transposed
        acc = tl.zeros([BLOCK_OUT, BLOCK_M], tl.float32)
        for k0 in range(k_first, tl.minimum(IN, k_first + K_SPLIT), BLOCK_IN):
            group = k0 // 32 + g                                             # [GROUPS] scale column
            group_ok = group < IN // 32                                      # IN is a multiple of 32
            byte = group[:, None] * 16 + tl.arange(0, 16)[None, :]           # [GROUPS, 16] packed column
            packed = tl.load(w_rows + byte[None, :, :], mask=row_ok[:, None, None] & group_ok[None, :, None],
                             other=0).to(tl.int32)                           # uint8 -> 0..255
            scale = tl.load(s_rows + group[None, :], mask=row_ok[:, None] & group_ok[None, :], other=0)
            scale = (_e8m0_value(scale.to(tl.int32)) * 16384.0)[:, :, None]   # 2^14: see _e2m1_times_2_pow_minus_14
            even = (_e2m1_times_2_pow_minus_14(packed & 15) * scale).to(dot_type)
            odd = (_e2m1_times_2_pow_minus_14(packed >> 4) * scale).to(dot_type)
            w = tl.reshape(tl.join(even, odd), [BLOCK_OUT, BLOCK_IN])        # [.., byte, nibble] = input order
            col = k0 + cols
            xt = tl.load(x_cols + col[:, None], mask=(col < IN)[:, None] & m_ok[None, :], other=0.0)
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
        store_part(acc, y_ptr, part_ptr, sel[None, :] * sy + rows[:, None], row_ok[:, None] & m_ok[None, :],
                    sy_split, SPLITS)
    if SPLITS > 1:
        _sum_expert_splits(part_ptr, y_ptr, tickets_ptr, order_ptr, first, count, rows, row_ok, sy, sy_split,
                           BLOCK_M, SPLITS)


@triton.jit
def _fp8_grouped_kernel(
    x_ptr, w_ptr, s_ptr, order_ptr, starts_ptr, counts_ptr, experts_ptr, y_ptr, part_ptr, tickets_ptr,
    OUT, IN, K_SPLIT, sx, sw_e, sw_o, ss_e, ss_o, sy, sy_split,
    BLOCK_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, PRECISION: tl.constexpr,
    SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """Same grouping for e4m3 weights: BLOCK_OUT and BLOCK_IN divide 128, so a tile has ONE ue8m0 scale, which
    multiplies the tile's float32 partial product (a power of two: the same value as scaling the weights first)."""
    after_previous_kernel(PDL)
    expert = tl.load(experts_ptr + tl.program_id(1)).to(tl.int64)
    count = tl.load(counts_ptr + expert)
    first = tl.load(starts_ptr + expert)
    k_first = tl.program_id(2) * K_SPLIT                  # this program's share of the inputs: K_SPLIT of them
    ob = tl.program_id(0)
    rows = ob * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows < OUT
    cols = tl.arange(0, BLOCK_IN)
    w_rows = w_ptr + expert * sw_e + rows[:, None].to(tl.int64) * sw_o
    s_row = s_ptr + expert * ss_e + (ob * BLOCK_OUT // 128) * ss_o
    dot_type = x_ptr.dtype.element_ty
    for m0 in range(0, count, BLOCK_M):
        sel, m_ok = _chunk(order_ptr, first, m0, count, BLOCK_M)
        x_cols = x_ptr + sel[None, :] * sx
        acc = tl.zeros([BLOCK_OUT, BLOCK_M], tl.float32)
        for k0 in range(k_first, tl.minimum(IN, k_first + K_SPLIT), BLOCK_IN):
            col = k0 + cols
            col_ok = col < IN
            w = tl.load(w_rows + col[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            xt = tl.load(x_cols + col[:, None], mask=col_ok[:, None] & m_ok[None, :], other=0.0)
            scale = _e8m0_value(tl.load(s_row + k0 // 128).to(tl.int32))
            acc += tl.dot(w.to(dot_type), xt, input_precision=PRECISION) * scale
        store_part(acc, y_ptr, part_ptr, sel[None, :] * sy + rows[:, None], row_ok[:, None] & m_ok[None, :],
                    sy_split, SPLITS)
    if SPLITS > 1:
        _sum_expert_splits(part_ptr, y_ptr, tickets_ptr, order_ptr, first, count, rows, row_ok, sy, sy_split,
                           BLOCK_M, SPLITS)


def _groups(expert_idx: torch.Tensor, n_experts: int, all_valid: bool) -> tuple[torch.Tensor, ...]:
    """Selections grouped by expert with static shapes, no host sync (`bincount` reads its maximum back) and no
    atomics: `order` lists the selections expert by expert, expert e owning order[starts[e] : starts[e] + counts[e]];
    a negative id (another rank's selection) belongs to no expert. `experts` lists min(E, N) experts, most rows
    first, so it holds every used one and the grid needs no column per idle expert (256 at V4 decode).
    `all_valid`: the caller vouches that no id is negative (a projection's rows), so one weight needs no work."""
    dev = expert_idx.device
    n = expert_idx.numel()
    if n_experts == 1:      # one weight: no sort (~25 us at decode)
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        if all_valid:
            return torch.arange(n, device=dev), zero, torch.full((1,), n, dtype=torch.int64, device=dev), zero
        valid = expert_idx >= 0     # some rows maybe another rank's: valid rows first
        kept = valid.cumsum(0)
        count = kept[-1:] if kept.numel() else zero
        pos = torch.where(valid, kept - 1, count + (~valid).cumsum(0) - 1)
        order = torch.empty_like(pos).scatter_(0, pos, torch.arange(n, device=dev))
        return order, zero, count, zero
    sorted_idx, order = torch.sort(expert_idx.int())       # int32 keys: half the radix passes of int64
    bounds = torch.searchsorted(sorted_idx, torch.arange(n_experts + 1, device=dev, dtype=torch.int32))
    starts, counts = bounds[:-1], bounds.diff()
    experts = torch.argsort(counts, descending=True)[:min(n_experts, order.numel())]
    return order, starts, counts, experts


def _launch_grouped(kernel, x, weight, scale, expert_idx, block_out, block_m, block_in, split_k, num_warps,
                    num_stages, all_valid, groups) -> torch.Tensor:
    n, n_out, n_in = x.size(0), weight.size(1), x.size(1)
    if n == 0:
        return x.new_empty(0, n_out)
    x, s = _operands(x, weight, scale)
    if block_m is None:
        block_m = grouped_block_m(n, weight.size(0))
    order, starts, counts, experts = groups or _groups(expert_idx, weight.size(0), all_valid)
    grid = (triton.cdiv(n_out, block_out), experts.numel())
    if split_k is None:
        split_k = split_k_for(grid[0] * grid[1], n_in, block_in, x.device)
    split_k, k_split, y, part, tickets = _split_out(x, n_out, n_in, block_in, split_k, grid[0] * grid[1])
    if not all_valid:
        y.zero_()           # rows of no expert (negative ids) are never written
    kernel[grid + (split_k,)](x, weight, s, order, starts, counts, experts, y, part, tickets, n_out, n_in, k_split,
                              x.stride(0), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1), y.stride(0),
                              part.stride(0) if split_k > 1 else 0,
                              BLOCK_OUT=block_out, BLOCK_M=block_m, BLOCK_IN=block_in,
                              PRECISION=dot_precision(x.dtype), SPLITS=split_k, num_warps=num_warps,
                              num_stages=num_stages, **launch_options(x.device))
    return y


SPLIT_K_PROGRAMS_PER_SM = 4


def split_k_for(programs: int, n_in: int, block_in: int, device: torch.device) -> int:
    """Input splits from shapes alone so that a small grid still has SPLIT_K_PROGRAMS_PER_SM programs per SM: a
    projection (E = 1) has only out / block_out programs (wo_b with 32-row blocks: 128 programs of 256 KiB each
    on 132 SMs; wkv, 512 outputs: 16), while the routed experts already have many. At least two input blocks per
    split; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return max(1, min(n_in // (2 * block_in), SPLIT_K_PROGRAMS_PER_SM * sm_count(device) // programs))


GROUPED_MAX_BLOCK_M = 64


def grouped_block_m(n_rows: int, n_experts: int) -> int:
    """Rows per `tl.dot` tile from shapes alone: the mean rows per expert if min(E, N) experts share them, as a
    power of two in [16 (the smallest dot), GROUPED_MAX_BLOCK_M]. A projection (E = 1) at batch 32 gets 32, so
    its weight is decoded once; MoE decode (E = 256, N <= 256) gets 16."""
    per_expert = -(-n_rows // max(1, min(n_experts, n_rows)))
    return min(GROUPED_MAX_BLOCK_M, max(16, triton.next_power_of_2(per_expert)))


def grouped_matmul_fp4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_idx: torch.Tensor,
                       block_out: int = 64, block_m: int | None = None, block_in: int = 256,
                       split_k: int | None = None, num_warps: int = 4, num_stages: int = 2,
                       all_valid: bool = False, groups: tuple | None = None) -> torch.Tensor:
    """`expert_matmul_fp4` with the rows grouped by expert (tensor cores). `block_out`, `block_m` >= 16 and
    `block_in` >= 32 are powers of two; None picks `block_m` by `grouped_block_m`, `split_k` (programs per
    output tile, each over a share of the inputs) by `split_k_for`. `all_valid`: no negative expert id (see
    `_groups`); `groups`: the grouping if the caller has it (`group_experts`), else grouped here."""
    assert weight.size(2) * 2 == x.size(1) and block_in >= 2 * 16
    return _launch_grouped(_fp4_grouped_kernel, x, weight.view(torch.uint8), scale, expert_idx, block_out, block_m,
                           block_in, split_k, num_warps, num_stages, all_valid, groups)


def grouped_matmul_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_idx: torch.Tensor,
                       block_out: int = 64, block_m: int | None = None, block_in: int = 128,
                       split_k: int | None = None, num_warps: int = 4, num_stages: int = 2,
                       all_valid: bool = False, groups: tuple | None = None) -> torch.Tensor:
    """`expert_matmul_fp8` with the rows grouped by expert (tensor cores). `block_out` and `block_in` are powers of
    two in [16, 128] (one scale block per tile); `block_m`, `split_k`, `all_valid`, `groups` as for
    `grouped_matmul_fp4`."""
    assert weight.size(2) == x.size(1) and 128 % block_out == 0 and 128 % block_in == 0 and block_in >= 16
    return _launch_grouped(_fp8_grouped_kernel, x, weight, scale, expert_idx, block_out, block_m, block_in,
                           split_k, num_warps, num_stages, all_valid, groups)


# ------------------------------------------------------------------------------------------------ the chooser
GROUPED_MIN_ROWS = {"fp4": 768, "fp8": 128}
"""`expert_matmul` runs the grouped kernel from this many rows (selections) on, per weight format, and for every
multi-row projection (one expert: the per-selection kernel would read the whole weight once per row). From
`scripts/bench_moe.py --cases fp4 --batch 1,32,64,96,128` on an H200 at V4-Flash shapes (experts, 6 per token): the
fp4 per-selection walk with float16 multiply-adds is faster up to 576 rows (batch 96; joint w1 + w3 1,656 against
1,834 us, w2 878 against 903), grouped at 768 (1,962 against 2,187, w2 974 against 1,159); between the two was not
timed (docs/performance.md). fp8: per selection faster at 6 and 48 rows, grouped at 192 and 384."""

_KERNELS = {"fp4": (expert_matmul_fp4, grouped_matmul_fp4), "fp8": (expert_matmul_fp8, grouped_matmul_fp8)}


def use_grouped(n_rows: int, n_experts: int, fmt: str) -> bool:
    """The chooser's rule, from shapes and format only (so a captured graph keeps one kernel, and a grouping made
    ahead by `group_experts` / `strided_groups` is the one `expert_matmul` wants)."""
    return n_rows >= GROUPED_MIN_ROWS[fmt] or (n_experts == 1 and n_rows > 1)


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: str, expert_idx: torch.Tensor,
                  gemv: dict | None = None, grouped: dict | None = None, all_valid: bool = False,
                  groups: tuple | None = None) -> torch.Tensor:
    """`model.kernels.expert_matmul` for fmt "fp4" / "fp8": the grouped kernel when `use_grouped`, else the
    per-selection one, each with its launch settings (`gemv`, `grouped`: keyword arguments of the launchers).
    `all_valid`: no expert id is negative (a projection's rows), which spares the grouping its checks. `groups`:
    `group_experts(expert_idx, E, fmt)` (or `strided_groups`) when the caller shares one grouping between
    calls on the same ids; None: each call sorts its ids."""
    per_selection, by_expert = _KERNELS[fmt]
    if use_grouped(x.size(0), weight.size(0), fmt):
        return by_expert(x, weight, scale, expert_idx, all_valid=all_valid, groups=groups, **(grouped or {}))
    return per_selection(x, weight, scale, expert_idx, order=groups[0] if groups else None, **(gemv or {}))


def group_experts(expert_idx: torch.Tensor, n_experts: int, fmt: str) -> tuple:
    """What `expert_matmul` on these ids would compute before launching, once for several calls (a MoE layer's
    joint w1 + w3 and its w2 share their ids): the grouping of `_groups` for the grouped kernel, the visiting order
    alone for the per-selection one (~20 us per sort at decode)."""
    if use_grouped(expert_idx.numel(), n_experts, fmt):
        return _groups(expert_idx, n_experts, all_valid=False)
    return (torch.argsort(expert_idx.int()),)


def strided_groups(tokens: int, n_groups: int, device: torch.device, fmt: str) -> tuple:
    """`group_experts` of the ids `arange(n_groups).repeat(tokens)` (row t * G + g belongs to group g: a grouped
    output projection) without sorting them: group g owns rows g, g + G, ...; the visiting order alone for the
    per-selection kernel (decode), with `_groups`' bounds for the grouped one."""
    n = tokens * n_groups
    order = torch.arange(n, device=device).view(tokens, n_groups).t().flatten()
    if not use_grouped(n, n_groups, fmt):
        return (order,)
    groups = torch.arange(n_groups, device=device)
    return order, groups * tokens, torch.full((n_groups,), tokens, device=device), groups

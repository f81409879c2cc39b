"""Triton kernel for the static MoE path: rows times gathered FP4 expert weights, dequantised in registers.

`expert_matmul_fp4(x, weight, scale, expert_idx, ...)`: y[n] = dequant(weight[expert_idx[n]]) @ x[n] (the contract
of `model.kernels.expert_matmul` for fmt "fp4"). The reference gathers and dequantises every selection's weight
to bf16 first ([N, out, in], ~10 GB per layer at batch 32 on V4-Flash); here each program reads only the packed
e2m1 bytes and ue8m0 scales of its own (selection, block of output rows) and decodes them next to the multiply, so
the traffic is the FP4 bytes of each selection (4x less than bf16, and no write-back).

Layout: one program per (block of BLOCK_OUT output rows, selection). Programs run selections in the order of
`argsort(expert_idx)`, so selections sharing an expert are launched back to back and the second one reads the
expert's bytes from L2. The input is walked in BLOCK_IN chunks seen as [BLOCK_IN / 32 scale groups, 16 bytes]:
low nibbles multiply the even inputs, high nibbles the odd ones, each group's float32 partial sum is scaled once.
Decoding is a few integer ops per nibble (a float16 bit pattern, see `_e2m1_times_2_pow_minus_14`): at batch 32
the kernel decodes ~2.4 GB of FP4 per V4-Flash layer, so ALU work per byte matters as much as bytes.
Shapes of the launch depend only on tensor shapes and there is no host sync, so it is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP4_GROUP = 32          # inputs per ue8m0 scale (model.quant.FP4_BLOCK)


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
def _fp4_expert_matmul_kernel(
    x_ptr, w_ptr, s_ptr, idx_ptr, order_ptr, y_ptr,
    OUT, IN, sx, sw_e, sw_o, ss_e, ss_o, sy,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_IN // 32
    ob = tl.program_id(0)
    sel = tl.load(order_ptr + tl.program_id(1)).to(tl.int64)
    expert = tl.load(idx_ptr + sel).to(tl.int64)
    rows = ob * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows < OUT
    g = tl.arange(0, GROUPS)
    b = tl.arange(0, 16)
    w_rows = w_ptr + expert * sw_e + rows[:, None, None].to(tl.int64) * sw_o
    s_rows = s_ptr + expert * ss_e + rows[:, None].to(tl.int64) * ss_o
    x_row = x_ptr + sel * sx
    acc = tl.zeros([BLOCK_OUT, GROUPS], tl.float32)     # summed over groups once, after the loop
    for k0 in range(0, IN, BLOCK_IN):
        group = k0 // 32 + g                                          # [GROUPS] scale column
        group_ok = group < IN // 32                                   # IN is a multiple of 32
        byte = group[:, None] * 16 + b[None, :]                       # [GROUPS, 16] packed column
        x_even = tl.load(x_row + 2 * byte, mask=group_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + 2 * byte + 1, mask=group_ok[:, None], other=0.0).to(tl.float32)
        packed = tl.load(w_rows + byte[None, :, :], mask=row_ok[:, None, None] & group_ok[None, :, None],
                         other=0).to(tl.int32)                         # uint8 -> 0..255
        part = tl.sum(_e2m1_times_2_pow_minus_14(packed & 15) * x_even[None]
                      + _e2m1_times_2_pow_minus_14(packed >> 4) * x_odd[None], axis=2)
        scale = tl.load(s_rows + group[None, :], mask=row_ok[:, None] & group_ok[None, :], other=0).to(tl.int32)
        acc += part * _e8m0_value(scale)
    y = tl.sum(acc, axis=1) * 16384.0                                 # 2^14: see _e2m1_times_2_pow_minus_14
    tl.store(y_ptr + sel * sy + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _fp8_expert_matmul_kernel(
    x_ptr, w_ptr, s_ptr, idx_ptr, order_ptr, y_ptr,
    OUT, IN, sx, sw_e, sw_o, ss_e, ss_o, sy,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """Same walk for FP8 e4m3 weights with one ue8m0 scale per 128 x 128 block: BLOCK_IN is at most 128 and
    divides it, so each chunk of a row has one scale."""
    ob = tl.program_id(0)
    sel = tl.load(order_ptr + tl.program_id(1)).to(tl.int64)
    expert = tl.load(idx_ptr + sel).to(tl.int64)
    rows = ob * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows < OUT
    cols = tl.arange(0, BLOCK_IN)
    w_rows = w_ptr + expert * sw_e + rows[:, None].to(tl.int64) * sw_o
    s_rows = s_ptr + expert * ss_e + (rows // 128).to(tl.int64) * ss_o
    x_row = x_ptr + sel * sx
    acc = tl.zeros([BLOCK_OUT], tl.float32)
    for k0 in range(0, IN, BLOCK_IN):
        col = k0 + cols
        col_ok = col < IN
        x = tl.load(x_row + col, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + col[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        scale = tl.load(s_rows + k0 // 128, mask=row_ok, other=0).to(tl.int32)
        acc += tl.sum(w * x[None, :], axis=1) * _e8m0_value(scale)
    tl.store(y_ptr + sel * sy + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def _launch(kernel, x, weight, scale, expert_idx, block_out, block_in, num_warps, sort) -> torch.Tensor:
    n = x.size(0)
    x = x.contiguous()
    s = scale.view(torch.uint8)
    assert weight.stride(-1) == 1 and s.stride(-1) == 1
    order = torch.argsort(expert_idx) if sort else torch.arange(n, device=x.device)
    y = torch.empty(n, weight.size(1), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    grid = (triton.cdiv(weight.size(1), block_out), n)
    kernel[grid](x, weight, s, expert_idx, order, y, weight.size(1), x.size(1), x.stride(0), weight.stride(0),
                 weight.stride(1), s.stride(0), s.stride(1), y.stride(0),
                 BLOCK_OUT=block_out, BLOCK_IN=block_in, num_warps=num_warps)
    return y


def expert_matmul_fp4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_idx: torch.Tensor,
                      block_out: int = 32, block_in: int = 512, num_warps: int = 4,
                      sort: bool = True) -> torch.Tensor:
    """x [N, in]; weight [E, out, in/2] packed e2m1 (int8 / uint8); scale [E, out, in/32] float8_e8m0fnu (or its
    bytes); expert_idx [N] -> [N, out] in x's dtype. `block_in` is a power of two >= 32."""
    assert weight.size(2) * 2 == x.size(1) and block_in >= FP4_GROUP
    return _launch(_fp4_expert_matmul_kernel, x, weight.view(torch.uint8), scale, expert_idx, block_out, block_in,
                   num_warps, sort)


def expert_matmul_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_idx: torch.Tensor,
                      block_out: int = 32, block_in: int = 128, num_warps: int = 4,
                      sort: bool = True) -> torch.Tensor:
    """x [N, in]; weight [E, out, in] float8_e4m3fn; scale [E, ceil(out/128), ceil(in/128)] float8_e8m0fnu;
    expert_idx [N] -> [N, out] in x's dtype. `block_in` is a power of two dividing 128."""
    assert weight.size(2) == x.size(1) and 128 % block_in == 0
    return _launch(_fp8_expert_matmul_kernel, x, weight, scale, expert_idx, block_out, block_in, num_warps, sort)

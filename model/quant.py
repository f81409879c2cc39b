"""DeepSeek-V4 number formats: quantise, dequantise and simulate, with torch's native dtypes.

Formats (all scales are ue8m0 = `torch.float8_e8m0fnu`, i.e. powers of two):

* FP8 weights: `torch.float8_e4m3fn` values, one scale per 128 x 128 block; the scale tensor is
  `[ceil(out / 128), ceil(in / 128)]` (ragged edge blocks are allowed).
* FP4 weights (routed experts): e2m1 values packed two per byte along the input dim, LOW nibble first
  (element 2i in bits 0-3, element 2i+1 in bits 4-7), stored as `torch.int8` `[out, in / 2]`; one scale per
  32 inputs, `[out, in / 32]`. The same bytes viewed as `torch.float4_e2m1fn_x2` are the official layout.
* int8 weights: symmetric per output channel, `float32` scale `[out]`.
* Round-trip simulations used by attention (quantisation-aware training): FP8 blocks of 64 along the last
  dim for the KV cache, FP4 blocks of 32 for the indexer, both with power-of-two scales.

torch 2.13 has no conversion kernels for `float4_e2m1fn_x2` ("copy_kernel" is not implemented on CPU), so
e2m1 encoding / decoding is done here on 4-bit codes (round to nearest, ties to even, like every IEEE cast)
and the packing handles the nibbles by hand. Every other cast is a plain `tensor.to(native_dtype)`.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "FP8_MAX", "FP4_MAX", "INT8_MAX", "FP8_BLOCK", "FP4_BLOCK", "KV_FP8_BLOCK", "E2M1_VALUES",
    "pow2_scale", "pow2_scale_exportable", "quantize_fp8", "dequantize_fp8", "fp8_scale_shape",
    "e2m1_encode", "e2m1_decode", "pack_fp4", "unpack_fp4", "quantize_fp4", "dequantize_fp4", "fp4_scale_shape",
    "quantize_int8", "dequantize_int8", "set_quant_sim", "fp8_round_trip", "fp4_round_trip",
    "fp8_round_trip_float", "fp4_round_trip_float",
    "FORMATS", "weight_layout", "quantize_weight", "dequantize_weight",
]

FP8_MAX = 448.0        # largest finite float8_e4m3fn
FP4_MAX = 6.0          # largest e2m1
INT8_MAX = 127.0
FP8_BLOCK = 128        # FP8 weight blocks are FP8_BLOCK x FP8_BLOCK
FP4_BLOCK = 32         # inputs per FP4 scale (weights and the indexer simulation)
KV_FP8_BLOCK = 64      # FP8 simulation block of the KV cache

# e2m1 code -> value; bit 3 is the sign, bits 0-2 index the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_PAIRS = tuple((E2M1_VALUES[b & 0x0F], E2M1_VALUES[b >> 4]) for b in range(256))  # packed byte -> 2 values

_E8M0_MAX_EXP = 127


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """A block's power-of-two scale as the official kernels take it (`fast_round_scale`): r = amax * (1 / qmax) in
    float32, then 2^(r's exponent field - 127, plus one unless its mantissa is zero), read from the bits: the exact
    ceiling for a normal r, 2^-126 for a subnormal one. Float32, the exponent at most ue8m0's 127 (the bits give
    at least -127: r = 0, which callers rule out by flooring amax, gives 2^-127 here and 0 in the official bit
    construction)."""
    bits = (amax.float() * (1.0 / qmax)).view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()
    return torch.exp2(exp.clamp_max(_E8M0_MAX_EXP).float())


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exact: Log/Log(2) can be off by one at powers of two, so correct it."""
    e = torch.floor(torch.log(a) / math.log(2.0))
    return e + (torch.pow(2.0, e + 1) <= a).float() - (torch.pow(2.0, e) > a).float()


def pow2_scale_exportable(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """`pow2_scale` from Log and Pow only (no bit casts, which ONNX has not): the exact power-of-two ceiling of
    the same float32 product, below the normal range the official kernels' 2^-126 (2^-127 for zero)."""
    r = amax.float() * (1.0 / qmax)
    e = _floor_log2(r)
    e = torch.where(r >= 2.0 ** -126, e + (torch.pow(2.0, e) < r).float(), torch.where(r > 0, -126.0, -127.0))
    return torch.pow(2.0, e.clamp_max(_E8M0_MAX_EXP))


def _blocks_2d(x: torch.Tensor, block: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad a 2-D tensor to whole blocks and view it as [rows/b, b, cols/b, b]."""
    rows, cols = x.shape
    pr, pc = -rows % block, -cols % block
    x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.view((rows + pr) // block, block, (cols + pc) // block, block), (rows, cols)


def _expand_2d(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Repeat a per-block scale [..., r, c] over its block and crop the last two dims to `shape`."""
    r, c = scale.shape[-2:]
    full = scale[..., :, None, :, None].expand(*scale.shape[:-2], r, block, c, block)
    return full.reshape(*scale.shape[:-2], r * block, c * block)[..., : shape[0], : shape[1]]


# --------------------------------------------------------------------------- FP8 weights
def fp8_scale_shape(out_features: int, in_features: int, block: int = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the ue8m0 scale of an FP8 weight: one entry per (ceil-divided) block."""
    return -(-out_features // block), -(-in_features // block)


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D weight -> (float8_e4m3fn weight, float8_e8m0fnu scale per `block` x `block`)."""
    blocks, shape = _blocks_2d(weight.float(), block)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = pow2_scale(amax.clamp_min(torch.finfo(torch.float32).tiny), FP8_MAX)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).flatten(2, 3).flatten(0, 1)[: shape[0], : shape[1]]
    return q.to(torch.float8_e4m3fn), scale[:, 0, :, 0].to(torch.float8_e8m0fnu)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp8`; exact in bfloat16 and float32 (e4m3 times a power of two). Leading batch dims
    (a stack of weights [..., out, in] with scales [..., out/128, in/128]) are allowed."""
    return weight.to(dtype) * _expand_2d(scale.to(dtype), tuple(weight.shape[-2:]), block)


# --------------------------------------------------------------------------- FP4 (e2m1) weights
@functools.lru_cache(maxsize=None)
def _table(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant lookup table on `device`, made once: a host-to-device copy inside CUDA/NPU graph capture fails,
    and capture is preceded by warm-up runs that fill this cache."""
    return torch.tensor(values, dtype=dtype, device=device)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already scaled into [-6, 6]) to e2m1 codes 0..15, ties to even, as uint8."""
    x = x.float()
    mag = x.abs().clamp_max(FP4_MAX)
    mids = _table(_E2M1_MIDPOINTS, torch.float32, x.device)
    code = torch.bucketize(mag, mids)                    # lower code on an exact midpoint ...
    tie = (code < len(mids)) & (mag == mids[code.clamp_max(len(mids) - 1)])
    code = code + (tie & (code % 2 == 1)).long()         # ... moved up when the lower one is odd
    return (code | (torch.signbit(x).long() << 3)).to(torch.uint8)


def e2m1_decode(code: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e2m1 codes 0..15 (any integer dtype) -> values."""
    table = _table(tuple(E2M1_VALUES), dtype, code.device)
    return table[code.long()]


def pack_fp4(code: torch.Tensor) -> torch.Tensor:
    """Codes [..., n] (n even) -> int8 bytes [..., n/2], element 2i in the low nibble."""
    code = code.to(torch.uint8)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 / uint8 / float4_e2m1fn_x2 bytes [..., n/2] -> codes [..., n] (uint8), low nibble first."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def fp4_scale_shape(out_features: int, in_features: int, block: int = FP4_BLOCK) -> tuple[int, int]:
    """Shape of the ue8m0 scale of an FP4 weight: one entry per `block` inputs of each row."""
    return out_features, in_features // block


def _check_fp4_width(n: int, block: int) -> None:
    if n % block:
        raise ValueError(f"FP4 needs the last dim to be a multiple of {block}, got {n}")


def quantize_fp4(weight: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] -> (int8 packed e2m1 [..., n/2], float8_e8m0fnu scale [..., n/block])."""
    _check_fp4_width(weight.shape[-1], block)
    blocks = weight.float().unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = pow2_scale(amax.clamp_min(FP4_MAX * 2.0 ** -126), FP4_MAX)
    code = e2m1_encode((blocks / scale).flatten(-2))
    return pack_fp4(code), scale.squeeze(-1).to(torch.float8_e8m0fnu)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp4`; exact in bfloat16 and float32. Each byte is looked up whole in a 256-entry table
    of value pairs (int32 indices), which moves a quarter of the bytes that unpacking nibbles to int64 codes does."""
    pairs = _table(_E2M1_PAIRS, dtype, packed.device)
    values = pairs[packed.view(torch.uint8).int()].flatten(-2)
    return (values.unflatten(-1, (-1, block)) * scale.to(dtype).unsqueeze(-1)).flatten(-2)


# --------------------------------------------------------------------------- int8 weights
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D weight -> (int8 weight, float32 scale [out]); symmetric per output channel, round half to even."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_int8` (computed in float32, then cast); leading batch dims allowed."""
    return (weight.float() * scale.float()[..., None]).to(dtype)


# --------------------------------------------------------------------------- round-trip simulations
def set_quant_sim(module: torch.nn.Module, enabled: bool) -> None:
    """Switch the FP8 KV / FP4 indexer round-trip simulations of every submodule of `module` that has them."""
    for m in module.modules():
        if hasattr(m, "quant_sim"):
            m.quant_sim = enabled


def fp8_round_trip(x: torch.Tensor, block: int = KV_FP8_BLOCK) -> torch.Tensor:
    """Quantise the last dim to e4m3 per `block` with power-of-two scales and back, in x's dtype.

    Matches the official `act_quant(..., inplace=True)` with ue8m0 scales (amax floored at 1e-4).
    """
    blocks = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4), FP8_MAX)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).flatten(-2).to(x.dtype)


def fp4_round_trip(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Quantise the last dim to e2m1 per `block` with power-of-two scales and back, in x's dtype.

    Matches the official `fp4_act_quant(..., inplace=True)` (amax floored at 6 * 2^-126).
    """
    packed, scale = quantize_fp4(x, block)
    return dequantize_fp4(packed, scale, block).to(x.dtype)


# --------------------------------------------------------------------------- the same in float arithmetic
# The round trips above cast through float8 types and use bucketize and bit casts: inductor leaves the casts and
# code tables to unfused ATen launches (six per FP4 simulation in a compiled step), and an ONNX exporter can write
# none of them. These are the same functions in float32 arithmetic only, equal bit for bit: the scales are
# `pow2_scale_exportable`'s, rounding to the format's grid is `torch.round` (half to even) at the grid's step, and
# the sign is put back by a test that also sees -0. The ONNX export's quantisation operators and the compiled CUDA
# backend's FP4 simulation, which inductor fuses into one kernel.
def _with_sign_of(v: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """magnitude with v's sign, -0 included (1 / -0 = -inf): copysign in operators an ONNX graph has."""
    return torch.where(1.0 / v < 0, -magnitude, magnitude)


def fp8_round_trip_float(x: torch.Tensor, block: int = KV_FP8_BLOCK) -> torch.Tensor:
    """`fp8_round_trip` (e4m3, power-of-two scale per `block`) in float arithmetic."""
    blocks = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale_exportable(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4), FP8_MAX)
    v = (blocks / scale).clamp(-FP8_MAX, FP8_MAX)
    step = torch.pow(2.0, _floor_log2(v.abs().clamp_min(2.0 ** -6)) - 3)   # 3 mantissa bits; subnormals 2^-9
    r = (torch.round(v.abs() / step) * step).clamp_max(FP8_MAX)
    return _with_sign_of(v, r * scale).flatten(-2).to(x.dtype)


def fp4_round_trip_float(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """`fp4_round_trip` (e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6; power-of-two scale per `block`) in float arithmetic."""
    blocks = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale_exportable(blocks.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126), FP4_MAX)
    v = blocks / scale
    a = v.abs().clamp_max(FP4_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return _with_sign_of(v, torch.round(a / step) * step * scale).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------- one entry point per stored format
FORMATS = ("fp8", "fp4", "int8", "bf16", "fp32")
"""Weight storage formats; a Linear holds `weight` (+ `scale` unless bf16 / fp32) in one of them."""


def weight_layout(out_features: int, in_features: int, fmt: str
                  ) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype] | None]:
    """((weight shape, dtype), (scale shape, dtype) or None) of a [out, in] weight stored as `fmt`."""
    if fmt == "fp8":
        return ((out_features, in_features), torch.float8_e4m3fn), (
            fp8_scale_shape(out_features, in_features), torch.float8_e8m0fnu)
    if fmt == "fp4":
        _check_fp4_width(in_features, FP4_BLOCK)
        return ((out_features, in_features // 2), torch.int8), (
            fp4_scale_shape(out_features, in_features), torch.float8_e8m0fnu)
    if fmt == "int8":
        return ((out_features, in_features), torch.int8), ((out_features,), torch.float32)
    if fmt in ("bf16", "fp32"):
        return ((out_features, in_features), torch.bfloat16 if fmt == "bf16" else torch.float32), None
    raise ValueError(f"weight format {fmt!r}: expected one of {FORMATS}")


def quantize_weight(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float [out, in] weight -> (stored weight, scale or None) in format `fmt`."""
    if fmt == "fp8":
        return quantize_fp8(weight)
    if fmt == "fp4":
        return quantize_fp4(weight)
    if fmt == "int8":
        return quantize_int8(weight)
    weight_layout(*weight.shape, fmt)                   # validates fmt
    return weight.to(torch.bfloat16 if fmt == "bf16" else torch.float32), None


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stored weight (+ scale) in format `fmt` -> the [out, in] weight in `dtype`. Also takes a stack of
    weights [..., out, in] with their scales stacked the same way (the static MoE path gathers them so)."""
    if fmt == "fp8":
        return dequantize_fp8(weight, scale, dtype=dtype)
    if fmt == "fp4":
        return dequantize_fp4(weight, scale, dtype=dtype)
    if fmt == "int8":
        return dequantize_int8(weight, scale, dtype=dtype)
    weight_layout(*weight.shape[-2:], fmt)
    return weight.to(dtype)

"""model/quant.py against independent computations: torch's native casts, brute-force rounding, bit layouts."""

import math

import pytest
import torch

from model import quant as Q


def _ref_pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """Power-of-two ceiling via frexp (exact), independent of the Log path in quant.py."""
    m, e = torch.frexp(t)
    return torch.ldexp(torch.ones_like(t), torch.where(m == 0.5, e - 1, e))


def _ref_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The scale's definition: the power-of-two ceiling of amax * float32(1 / qmax)."""
    return _ref_pow2_ceil(amax.float() * torch.tensor(1.0 / qmax, dtype=torch.float32))


def _official_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The official kernels' fast_round_scale: amax * float32(1 / qmax), then the exponent field plus one unless the
    mantissa is zero, as a power of two (for a zero product 2^-127, where the official bit construction gives 0:
    callers floor amax so that it never arises)."""
    bits = (amax.float() * torch.tensor(1.0 / qmax, dtype=torch.float32)).view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float32), e)


@pytest.mark.parametrize("qmax", [Q.FP8_MAX, Q.FP4_MAX])
def test_pow2_scale_is_the_official_scale(qmax):
    """pow2_scale (bit reads) and pow2_scale_exportable (Log and Pow) against the official formula: random amax,
    powers of two, products just above / below powers of two (where a rounded float32 log2 misses the ceiling: the
    form before this test was off by one binade there), zero and subnormal products."""
    amax = torch.cat([torch.rand(1000) * 1000, torch.tensor([448.0, 224.0, 448.0 * 2 ** -20, 449.0, 6.0, 1e-4]),
                      (2.0 ** torch.arange(-100, 100)) * qmax])
    amax = torch.cat([amax, torch.nextafter(amax, torch.tensor(float("inf"))),
                      torch.nextafter(amax, torch.tensor(0.0)), amax * (1 + 2.0 ** -20),
                      torch.tensor([0.0, 1e-45, 1e-40, torch.finfo(torch.float32).tiny])])
    s = Q.pow2_scale(amax, qmax)
    assert torch.equal(s, _official_scale(amax, qmax))
    assert torch.equal(Q.pow2_scale_exportable(amax, qmax), s)
    normal = amax * (1.0 / qmax) >= 2.0 ** -126
    assert torch.equal(s[normal], _ref_scale(amax[normal], qmax))
    assert torch.equal(s.to(torch.float8_e8m0fnu).float(), s)       # ue8m0 holds it exactly


def test_every_e2m1_value_encodes_and_decodes():
    values = torch.tensor(Q.E2M1_VALUES)
    codes = Q.e2m1_encode(values)
    assert codes.tolist() == list(range(16))                          # -0.0 keeps its sign bit
    assert torch.equal(Q.e2m1_decode(torch.arange(16)), values)
    assert torch.equal(torch.signbit(Q.e2m1_decode(torch.arange(16))), torch.arange(16) >= 8)


def test_e2m1_rounding_is_nearest_ties_to_even():
    grid = torch.linspace(-7, 7, 14001)
    grid = torch.cat([grid, torch.tensor(Q._E2M1_MIDPOINTS), -torch.tensor(Q._E2M1_MIDPOINTS)])
    got = Q.e2m1_decode(Q.e2m1_encode(grid))
    mags = torch.tensor(Q.E2M1_VALUES[:8])
    # brute force: nearest magnitude, ties to the even code (mantissa bit 0)
    dist = (grid.abs().clamp_max(6)[:, None] - mags[None]).abs()
    best = dist.min(1, keepdim=True).values
    candidates = (dist == best)
    even = candidates & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(1), even.float().argmax(1), candidates.float().argmax(1))
    want = mags[idx] * torch.where(torch.signbit(grid), -1.0, 1.0)
    assert torch.equal(got, want)


def test_fp4_nibble_order_low_first():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = Q.pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.view(torch.uint8).tolist() == [[0x21, 0x8F]]
    assert torch.equal(Q.unpack_fp4(packed), codes)
    # the same bytes are the official float4_e2m1fn_x2 layout
    as_x2 = packed.view(torch.float4_e2m1fn_x2)
    assert as_x2.shape == (1, 2) and torch.equal(Q.unpack_fp4(as_x2), codes)


def test_fp4_weight_round_trip_and_scale_shape():
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]
    packed, scale = Q.quantize_fp4(w)
    assert packed.shape == (64, 48) and packed.dtype == torch.int8
    assert scale.shape == Q.fp4_scale_shape(64, 96) == (64, 3) and scale.dtype == torch.float8_e8m0fnu
    deq = Q.dequantize_fp4(packed, scale)
    s = scale.float().repeat_interleave(32, 1)
    # independent: every dequantised value is an e2m1 value times its scale, and the closest one
    assert torch.isin((deq / s), torch.tensor(Q.E2M1_VALUES)).all()
    assert ((w - deq).abs() <= s * 1.0 + 1e-30).all()                # half the widest e2m1 gap (2) times scale
    assert ((w / s).abs().amax() <= 6.0)                              # scales are large enough: no clipping
    assert torch.equal(Q.dequantize_fp4(packed, scale, dtype=torch.bfloat16).float(), deq)
    assert torch.equal(Q.dequantize_fp4(*Q.quantize_fp4(deq)), deq)  # idempotent
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_fp4(torch.randn(4, 40))


def test_fp8_weight_bit_exact_vs_native_cast():
    w = torch.randn(300, 200) * 3
    q, s = Q.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == Q.fp8_scale_shape(300, 200) == (3, 2)           # ceil-div: ragged edge blocks
    for bi in range(3):
        for bj in range(2):
            blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            scale = _ref_scale(blk.abs().amax(), 448.0)
            assert s[bi, bj].float() == scale
            assert s[bi, bj].view(torch.uint8).item() - 127 == round(math.log2(scale.item()))
            want = (blk / scale).to(torch.float8_e4m3fn)
            got = q[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    deq = Q.dequantize_fp8(q, s)
    assert torch.equal(deq, q.float() * s.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200])
    assert torch.equal(Q.dequantize_fp8(q, s, dtype=torch.bfloat16).float(), deq)
    assert ((w - deq).abs() <= deq.abs() * 2 ** -4 + 2 ** -9 * s.float().max()).all()


def test_int8_per_channel():
    w = torch.randn(16, 64) * torch.arange(1, 17)[:, None]
    q, s = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (16,) and s.dtype == torch.float32
    assert torch.equal(q.abs().amax(1), torch.full((16,), 127, dtype=torch.int8))
    assert torch.equal(q, torch.round(w / (w.abs().amax(1, keepdim=True) / 127)).to(torch.int8))
    assert ((Q.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_fp8_round_trip_simulation_matches_native_cast():
    x = torch.randn(3, 5, 448, dtype=torch.bfloat16) * 4
    y = Q.fp8_round_trip(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    blocks = x.float().unflatten(-1, (-1, 64))
    scale = _ref_scale(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4), 448.0)
    want = ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).flatten(-2).to(torch.bfloat16)
    assert torch.equal(y, want)
    assert torch.equal(Q.fp8_round_trip(y), y)                       # idempotent


def test_fp4_round_trip_simulation():
    x = torch.randn(2, 4, 128)
    y = Q.fp4_round_trip(x)
    blocks = x.unflatten(-1, (-1, 32))
    scale = _ref_scale(blocks.abs().amax(-1, keepdim=True), 6.0)
    assert torch.isin((y.unflatten(-1, (-1, 32)) / scale), torch.tensor(Q.E2M1_VALUES)).all()
    assert torch.equal(Q.fp4_round_trip(y), y)
    assert torch.equal(Q.fp4_round_trip(torch.zeros(1, 32)), torch.zeros(1, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_round_trips_equal_the_cast_forms(dtype):
    """fp8 / fp4_round_trip_float (the ONNX export's and the CUDA backend's forms) equal the float8-cast ones bit for
    bit, zeros' signs included: random blocks over 60 binades, powers of two, zero blocks of both signs, every e2m1 / e4m3 midpoint (ties to
    even) at three scales, subnormal magnitudes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096, generator=g) * torch.logspace(-30, 30, 64)[:, None]
    x[0, :64] = 2.0 ** torch.arange(-32, 32)
    x[1, :64], x[2, :64] = 0.0, -0.0
    x[3, :64] = torch.tensor([1.0625, 1.1875, 9.0, 11.0, 208.0, 232.0, 448.0, -3.0] * 8)  # e4m3 midpoints
    x[4, :64] = 1e-40
    x[4, 1:64:2] = -3e-39
    ties = torch.tensor(Q._E2M1_MIDPOINTS + Q.E2M1_VALUES[:8] + (-0.25, -1.75, -5.0, -0.0, 1e-3, 7.0, 6.0, -3.5, 2.5,
                                                                0.75, -1.25, 0.0, 5.5, 4.5, 0.1, 3.0, -2.0))
    for row, scale in zip((5, 6, 7), (1.0, 2.0 ** -20, 2.0 ** 30)):
        x[row, :32] = ties * scale           # a block of its own: amax 7 clamps, the rest are exact midpoints
    x = x.to(dtype)
    for block, cast, fused in ((64, Q.fp8_round_trip, Q.fp8_round_trip_float),
                               (32, Q.fp4_round_trip, Q.fp4_round_trip_float)):
        mine, ref = fused(x, block), cast(x, block)
        assert torch.equal(mine, ref) and torch.equal(torch.signbit(mine), torch.signbit(ref))

"""The indexer's fused rotation of its queries and keys (ascend/backends/triton_index_rotate.py: RoPE, Hadamard,
FP4 simulation) against the stages it replaces.

On the GPU when CUDA and triton are present (bf16 and float32), else on CPU tensors through Triton's interpreter
(float32 only: the interpreter's bf16 products are not the GPU's). Values whose every sum is exact in float32
(small integers, quarter-turn angles, power-of-two magnitudes) make the result independent of the order the
Hadamard adds in, so the kernel must equal the reference stages to the bit there; on random values its Hadamard
differs from the butterfly by float32 rounding, which the FP4 grid absorbs but for rare values at a rounding
boundary.
"""

import pytest
import torch

from ascend.backends import cuda
from model import quant
from model.kernels import REFERENCE

DEVICE = "cuda" if cuda.triton_available() else "cpu"
if not cuda.triton_runs_on(DEVICE):
    pytest.skip("needs triton with a CUDA device, or TRITON_INTERPRET=1", allow_module_level=True)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def _stages(q, cos, sin, fp4_block):
    y = REFERENCE.hadamard(REFERENCE.rope(q, cos, sin))
    return quant.fp4_round_trip(y, fp4_block) if fp4_block else y


def _angles(shape, g, quarter_turns: bool):
    if quarter_turns:
        a = torch.randint(0, 4, shape, generator=g).float() * (torch.pi / 2)
        return a.cos().round().to(DEVICE), a.sin().round().to(DEVICE)
    a = torch.randn(shape, generator=g) * 10
    return a.cos().to(DEVICE), a.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp4_block", [32, 0])
@pytest.mark.parametrize("heads", [5, 1])
def test_fused_rotation_equals_the_stages_on_exact_values(dtype, fp4_block, heads):
    """Query-shaped rows (2 x 3 tokens x 5 heads = 30: two programs of 16, the last partial) and key-shaped ones
    (2 sequences x 3 entries x 1: 6 rows, one partial program), 128 dims with 64 rotated: small integers scaled by
    powers of two from 2^-130 (below the FP4 scale's floor) to 2^100, an all-zero row and negative zeros."""
    g = torch.Generator().manual_seed(fp4_block)
    q = torch.randint(-8, 9, (2, 3, heads, 128), generator=g).float()
    q *= torch.tensor([2.0 ** -130, 1.0, 2.0 ** 100])[None, :, None, None]
    q[0, 1, heads // 2] = 0.0
    q[0, 2, heads - 1, :7] = -0.0
    cos, sin = _angles((2, 3, 32), g, quarter_turns=True)
    q = q.to(dtype).to(DEVICE)
    got = cuda.index_rotate_triton(q, cos, sin, fp4_block)
    want = _stages(q, cos, sin, fp4_block)
    assert got.dtype == dtype and torch.equal(got, want)
    # negative values that round to zero stay -0 (the sign of an exact zero sum is the adding order's, not checked)
    nonzero = REFERENCE.hadamard(REFERENCE.rope(q, cos, sin)) != 0
    assert torch.equal(torch.signbit(got)[nonzero], torch.signbit(want)[nonzero])


def _tie_pair(dtype, hi: float, lo: float, n: int = 256):
    """(x0, x1) in `dtype` for which the Hadamard outputs of a row holding only them, (x0 + x1) c at even dims and
    (x0 - x1) c at odd ones (c = 128^-0.5, rounded to dtype as the stages round), are exactly hi and lo: a search
    among the dtype's neighbours of the exact solution."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    c = torch.tensor(128 ** -0.5)

    def around(v):
        return (torch.tensor(v, dtype=dtype).view(bits) + torch.arange(-n, n + 1, dtype=bits)).view(dtype)
    x0, x1 = around((hi + lo) / 2 / c.item()), around((hi - lo) / 2 / c.item())
    a, b = x0[:, None].float(), x1[None, :].float()
    hit = ((((a + b) * c).to(dtype) == hi) & (((a - b) * c).to(dtype) == lo)).nonzero()
    return x0[hit[0, 0]].item(), x1[hit[0, 1]].item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rotation_rounds_fp4_ties_to_even_and_keeps_negative_zeros(dtype):
    """Rows whose FP4 inputs sit exactly halfway between grid points, in both directions under half-to-even
    (float32: 5 -> 4 and 1.75 -> 2; bf16: 5 -> 4 and 3.5 -> 4; the block's scale 1), negated, and a row whose
    small negative values round to -0: equal to the stages' values and signs."""
    hi, lo = (5.0, 1.75) if dtype == torch.float32 else (5.0, 3.5)
    x0, x1 = _tie_pair(dtype, hi, lo)
    q = torch.zeros(1, 1, 3, 128)
    q[0, 0, 0, :2] = torch.tensor([x0, x1])
    q[0, 0, 1, :2] = torch.tensor([-x0, -x1])
    q[0, 0, 2, :2] = torch.tensor([10.0, 10.5])            # outputs 20.5 c and -0.5 c: the latter rounds to -0
    q = q.to(dtype).to(DEVICE)
    cos, sin = _angles((1, 1, 32), torch.Generator().manual_seed(2), quarter_turns=False)
    stage_in = REFERENCE.hadamard(REFERENCE.rope(q, cos, sin))
    assert torch.equal(stage_in[0, 0, 0, :2].float().cpu(), torch.tensor([hi, lo]))           # ties, as meant
    got, want = cuda.index_rotate_triton(q, cos, sin, 32), _stages(q, cos, sin, 32)
    assert want[0, 0, 0, :2].float().cpu().tolist() == [4.0, 2.0 if lo == 1.75 else 4.0]      # half to even
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.signbit(want[0, 0, 2, 1::2]).all()


def test_fused_rotation_refuses_shapes_it_cannot_index():
    from ascend.backends import triton_index_rotate
    q, cos = torch.zeros(2, 1, 4, 128), torch.zeros(2, 1, 32)
    for bad_q, bad_cos, block, what in ((q[0], cos, 32, "must be"), (q, cos[:1], 32, "cos / sin"),
                                        (q, torch.zeros(2, 1, 80), 32, "R <= 128"), (q[..., :96], cos, 32, "power"),
                                        (q, cos, 48, "FP4 block 48"), (q[..., :16], cos[..., :8], 32, "FP4 block 32")):
        with pytest.raises(ValueError, match=what):
            triton_index_rotate.check_shapes(bad_q, bad_cos, bad_cos, block)
    triton_index_rotate.check_shapes(q, cos, cos, 32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rotation_on_random_values(dtype):
    """Batch 2, 3 tokens, 64 heads: at most 1% of the FP4 values differ from the stages' (one grid step where the
    Hadamard's float32 sum lands on the other side of a rounding boundary); without FP4, float32 rounding."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(2, 3, 64, 128, generator=g) * 3).to(dtype).to(DEVICE)
    cos, sin = _angles((2, 3, 32), g, quarter_turns=False)
    got, want = cuda.index_rotate_triton(q, cos, sin, 32).float(), _stages(q, cos, sin, 32).float()
    assert (got != want).float().mean() <= 0.01
    assert (got - want).norm() <= 0.02 * want.norm()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(cuda.index_rotate_triton(q, cos, sin, 0), _stages(q, cos, sin, 0), **tol)


def test_indexer_queries_take_the_fused_entry_when_the_table_has_one(monkeypatch):
    """`Indexer.queries` hands (projected q, cos, sin, FP4 block or 0) to `Kernels.index_rotate` where set."""
    import dataclasses

    from model.config import ModelConfig
    from model.indexer import Indexer
    calls = []
    cfg = ModelConfig.preset("tiny", dtype="bf16")
    indexer = Indexer(cfg, 4)
    torch.nn.init.normal_(indexer.wq_b.weight)
    qr = torch.randn(2, 1, cfg.q_lora_rank).to(indexer.wq_b.weight.dtype)
    cos, sin = _angles((2, 1, cfg.rope_head_dim // 2), torch.Generator().manual_seed(0), quarter_turns=False)
    want = indexer.queries(qr, cos.cpu(), sin.cpu())
    indexer.kernels = dataclasses.replace(REFERENCE, index_rotate=lambda *a: calls.append(a[3]) or _stages(*a))
    torch.testing.assert_close(indexer.queries(qr, cos.cpu(), sin.cpu()), want, rtol=0, atol=0)
    indexer.quant_sim = False
    indexer.queries(qr, cos.cpu(), sin.cpu())
    assert calls == [32, 0]


@pytest.mark.parametrize("quant_sim", [True, False])
def test_indexer_keys_take_the_fused_entry_when_the_table_has_one(quant_sim):
    """The indexer's compressor hands its normed entries [B, N, 1, D], their blocks' angles (shapes the kernel
    accepts) and the FP4 block (or 0) to `Kernels.index_rotate` where set, and gives what the three stages give, in
    their dtype: a chunk of 8 tokens from positions 0 and 37 (the sequences' blocks at different angles), then a
    decode step completing a block; the main compressor does not take it."""
    import copy
    import dataclasses

    from ascend.backends import triton_index_rotate
    from ascend.onnx_export import synthetic_attention
    from model.cache import CompressorState
    from model.config import ModelConfig
    cfg = ModelConfig.preset("tiny", dtype="bf16")
    layer = synthetic_attention(cfg, next(i for i in range(cfg.n_layers) if cfg.compress_ratio(i) == 4))
    calls = []

    def fused(*a):
        triton_index_rotate.check_shapes(*a[:3], a[3])
        calls.append((tuple(a[0].shape), a[3]))
        return _stages(*a)
    table = dataclasses.replace(REFERENCE, index_rotate=fused)
    g = torch.Generator().manual_seed(3)
    steps = [(torch.randn(2, 8, cfg.dim, generator=g).to(torch.bfloat16), torch.tensor([0, 37]), torch.full((2,), 8)),
             (torch.randn(2, 1, cfg.dim, generator=g).to(torch.bfloat16), torch.tensor([8, 47]), torch.ones(2, dtype=torch.long))]
    for compressor, d in ((layer.indexer.compressor, cfg.index_head_dim), (layer.compressor, cfg.head_dim)):
        compressor.quant_sim = quant_sim
        states = {name: CompressorState.empty(2, 4, 2 * d, "cpu") for name in ("stages", "fused")}
        for x, start, n_valid in steps:                 # the states carry over from the chunk to the decode step
            outs = []
            for name, kernels in (("stages", REFERENCE), ("fused", table)):
                compressor.kernels = kernels
                outs.append(compressor(x, start, n_valid, states[name], layer.rotary))
            for want, got in zip(*outs):
                assert got.dtype == want.dtype and torch.equal(got, want)
            assert outs[0][1].any()                     # some block completes in each call
    block = 32 if quant_sim else 0
    assert calls == [((2, 3, 1, cfg.index_head_dim), block), ((2, 2, 1, cfg.index_head_dim), block)]

"""The Triton mHC kernels (ascend/backends/triton_mhc.py) against model.kernels.REFERENCE.

Run on the GPU when CUDA and triton are present, else on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1 with triton importable); skipped otherwise. Small block sizes make every launch cover several
blocks of D with a partial last one, so the tiny shapes here walk the same index paths as V4-Flash's.

Tolerances: float32 results may differ from the reference only by float32 rounding (the GEMV's summation order,
exp, fused multiply-adds): a few ulps, checked at rtol / atol 1e-5 (observed <= 5e-7 for values of order 1).
bf16 outputs are checked against the reference's float32 result on the same (exactly representable) inputs: within
one rounding to bf16 of it (see BF16_ROUNDING), which is what "float32 math, rounded once at the end" allows.
"""

import dataclasses

import pytest
import torch

from ascend.backends import cuda
from model.kernels import REFERENCE, _hc_mixes

TRITON_DEVICE = "cuda" if cuda.triton_available() else "cpu"
if not cuda.triton_runs_on(TRITON_DEVICE):
    pytest.skip("needs triton with a CUDA device, or TRITON_INTERPRET=1", allow_module_level=True)

from ascend.backends import triton_mhc  # noqa: E402  (imports triton)

ITERS, EPS, NORM_EPS = 20, 1e-6, 1e-6
# several blocks of D, of tokens and of partial sums, partial last ones, at test sizes
SMALL = dict(block_k=32, block_t=4, kb_chunk=4, block_d=32)
# One rounding of float32 to bf16, relative: half a bf16 ulp (2^-8) on the GPU (round to nearest even); the
# interpreter's float32 -> bf16 cast truncates, up to a whole ulp (2^-7).
BF16_ROUNDING = 2 ** -8 if TRITON_DEVICE == "cuda" else 2 ** -7


def _streams(tokens: int, n: int, d: int, dtype: torch.dtype, seed: int = 0, magnitude: float = 1.0):
    """Streams [1, tokens, n, d] (bf16 values exactly representable, so x.float() is the same input) and the
    hc_pre parameters at the scale `init_random_` gives them."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, tokens, n, d, generator=g) * magnitude).to(dtype)
    m = (2 + n) * n
    fn = torch.randn(m, n * d, generator=g) * (n * d) ** -0.5
    scale = 0.5 + torch.rand(3, generator=g)
    base = 0.1 * torch.randn(m, generator=g)
    return [t.to(TRITON_DEVICE) for t in (x, fn, scale, base)]


def _assert_rounded_from(out: torch.Tensor, exact: torch.Tensor) -> None:
    """`out` equals float32 `exact` up to float32 noise, plus one rounding to out's dtype if that is bf16."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    else:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), exact, rtol=BF16_ROUNDING + 1e-5, atol=1e-5)


def _check_pre(got, x, fn, scale, base, iters=ITERS):
    """post and comb against the reference Sinkhorn of the reference mixes; y against the reference hc_pre."""
    y, post, comb = got
    _, ref_post, ref_comb = REFERENCE.sinkhorn(_hc_mixes(x, fn, NORM_EPS), scale, base, iters, EPS)
    ref_y = REFERENCE.hc_pre(x.float(), fn, scale, base, iters, EPS, NORM_EPS)[0]
    assert y.shape == x.shape[:2] + x.shape[3:] and y.dtype == x.dtype
    assert post.dtype == comb.dtype == torch.float32 and comb.shape == x.shape[:3] + x.shape[2:3]
    torch.testing.assert_close(post, ref_post, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, ref_comb, rtol=1e-5, atol=1e-6)
    _assert_rounded_from(y, ref_y)


@pytest.mark.parametrize("n,tokens,d,dtype", [
    (4, 1, 100, torch.float32), (4, 3, 100, torch.bfloat16), (4, 32, 40, torch.float32),
    (3, 3, 50, torch.float32), (3, 1, 50, torch.bfloat16), (2, 32, 16, torch.bfloat16)])
def test_hc_pre_matches_reference(n, tokens, d, dtype):
    x, fn, scale, base = _streams(tokens, n, d, dtype)
    _check_pre(triton_mhc.launch_hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS, **SMALL), x, fn, scale, base)


def test_hc_pre_custom_op_default_launch_strided_streams_and_iteration_counts():
    x, fn, scale, base = _streams(3, 4, 200, torch.bfloat16, seed=1)
    x = torch.cat((x, x), dim=-1)[..., 100:300]            # streams 400 elements apart, not 200
    assert not x.is_contiguous()
    _check_pre(triton_mhc.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS), x, fn, scale, base)
    for iters in (1, 2):            # the first round (row softmax, columns) alone, and one alternation after it
        got = triton_mhc.launch_hc_pre(x, fn, scale, base, iters, EPS, NORM_EPS, **SMALL)
        _check_pre(got, x, fn, scale, base, iters)


# sigmoid(z) = 1 / (1 + exp(-z)): exp overflows to inf for z << 0, giving the exact limit 0 (numpy warns about it)
saturating = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@saturating
def test_hc_pre_extreme_mixes_stay_finite_and_match():
    """Logits of +-1000 (softmax and sigmoids far into saturation: exp overflows unless the max is subtracted),
    streams of magnitude 1e4 (the normaliser) and, separately, an all-zero token (rsqrt(0 + eps))."""
    x, fn, scale, base = _streams(3, 4, 100, torch.float32, seed=2, magnitude=1e4)
    base = torch.randn(base.shape, generator=torch.Generator().manual_seed(3)).to(base.device) * 1000
    x[0, 1] = 0
    got = triton_mhc.launch_hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS, **SMALL)
    assert all(t.isfinite().all() for t in got)
    y, post, comb = got
    ref_y, ref_post, ref_comb = REFERENCE.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    torch.testing.assert_close(post, ref_post, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, ref_comb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5 * 1e4)


@saturating
def test_hc_pre_large_scale_softmax_is_stable():
    """Mixes times a scale of 1e3: comb logits in the thousands. Float32 noise of the mixes (~1e-7 relative) is
    then ~1e-4 in the logits, so the softmax may move by that much relative, no more; no inf / NaN."""
    x, fn, scale, base = _streams(2, 4, 100, torch.float32, seed=4)
    scale = scale * 1e3
    y, post, comb = triton_mhc.launch_hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS, **SMALL)
    ref_y, ref_post, ref_comb = REFERENCE.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    assert comb.isfinite().all() and comb.abs().max() > 0.5          # saturated: near-permutation rows
    torch.testing.assert_close(comb, ref_comb, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(post, ref_post, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y, ref_y, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,tokens,d,dtype", [
    (4, 1, 100, torch.float32), (4, 3, 100, torch.bfloat16), (4, 32, 40, torch.bfloat16), (3, 3, 50, torch.float32)])
def test_hc_post_matches_reference(n, tokens, d, dtype):
    x, fn, scale, base = _streams(tokens, n, d, dtype, seed=5)
    _, post, comb = REFERENCE.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    y = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(6)).to(dtype).to(x.device)
    out = triton_mhc.launch_hc_post(y, x, post, comb, block_d=32)
    assert out.shape == x.shape and out.dtype == dtype
    _assert_rounded_from(out, REFERENCE.hc_post(y.float(), x.float(), post, comb))


def test_hc_post_custom_op_with_strided_inputs():
    """Streams sliced out of a wider tensor and comb stored transposed: the kernel follows the strides."""
    x, fn, scale, base = _streams(3, 4, 128, torch.bfloat16, seed=7)
    _, post, comb = REFERENCE.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    wide = torch.cat((x, x), dim=-1)[..., 64:192]
    comb_t = comb.mT.contiguous().mT
    y = torch.randn(2, 1, 3, 128).to(x)[1]
    assert not wide.is_contiguous() and not comb_t.is_contiguous()
    out = triton_mhc.hc_post(y, wide, post, comb_t)
    _assert_rounded_from(out, REFERENCE.hc_post(y.float(), wide.float(), post, comb))


@pytest.mark.parametrize("n,tokens,d,dtype", [(4, 3, 100, torch.float32), (4, 1, 100, torch.bfloat16),
                                              (3, 32, 20, torch.float32)])
def test_hc_head_matches_reference(n, tokens, d, dtype):
    x, _, scale, base = _streams(tokens, n, d, dtype, seed=8)
    fn = torch.randn(n, n * d, generator=torch.Generator().manual_seed(9)).to(x.device) * (n * d) ** -0.5
    out = triton_mhc.launch_hc_head(x, fn, scale[:1], base[:n], EPS, NORM_EPS, **SMALL)
    assert out.shape == x.shape[:2] + x.shape[3:]
    _assert_rounded_from(out, REFERENCE.hc_head(x.float(), fn, scale[:1], base[:n], EPS, NORM_EPS))
    _assert_rounded_from(triton_mhc.hc_head(x, fn, scale[:1], base[:n], EPS, NORM_EPS),
                         REFERENCE.hc_head(x.float(), fn, scale[:1], base[:n], EPS, NORM_EPS))


def test_wrong_fn_shape_is_rejected():
    x, fn, scale, base = _streams(1, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="hc fn"):
        triton_mhc.launch_hc_pre(x, fn[:, :-1], scale, base, ITERS, EPS, NORM_EPS)


def test_custom_op_registrations_pass_opcheck():
    """Schema, fake (meta) implementations and dispatch of the three ops, as torch.library checks them."""
    x, fn, scale, base = _streams(2, 4, 32, torch.bfloat16, seed=12)
    torch.library.opcheck(triton_mhc.hc_pre, (x, fn, scale, base, ITERS, EPS, NORM_EPS))
    y, post, comb = triton_mhc.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    torch.library.opcheck(triton_mhc.hc_post, (y, x, post, comb))
    torch.library.opcheck(triton_mhc.hc_head, (x, fn[:4], scale[:1], base[:4], EPS, NORM_EPS))


def test_custom_ops_trace_as_single_nodes():
    """torch.compile (aot_eager: tracing through the fake implementations, then the real ops) with fullgraph: one
    mHC round trip compiles without a graph break and gives the eager result."""
    x, fn, scale, base = _streams(2, 4, 64, torch.bfloat16, seed=10)

    def block(x):
        y, post, comb = triton_mhc.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)
        return triton_mhc.hc_post(y * 2, x, post, comb)

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), block(x))


@pytest.mark.skipif(not cuda.triton_available(), reason="needs a CUDA device")
def test_replays_under_cuda_graph():
    x, fn, scale, base = _streams(8, 4, 512, torch.bfloat16, seed=11)
    static_x = x.clone()

    def step():
        y, post, comb = triton_mhc.hc_pre(static_x, fn, scale, base, ITERS, EPS, NORM_EPS)
        return triton_mhc.hc_post(y, static_x, post, comb)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


def test_tiny_transformer_with_triton_mhc_matches_reference():
    """A whole tiny V4 (4 layers: window, CSA, HCA; hash and score MoE; float32, no FP8 / FP4 simulation) with the
    Triton hc_pre / hc_post / hc_head: prefill then one decode step. Float32 noise of ~1e-7 per mHC call goes
    through 4 blocks, routing and attention: the logits must agree to 1e-4 of their spread (a changed expert
    choice or a wrong stream would move them by O(1)).

    The table is given at construction: `use_kernels` does not reach the mHC helpers (plain objects, not modules)."""
    from model.config import ModelConfig
    from model.transformer import Transformer, init_random_

    calls = {"hc_pre": 0, "hc_post": 0, "hc_head": 0}

    def counted(name):
        def call(*args):
            calls[name] += 1
            return getattr(triton_mhc, name)(*args)
        return call

    cfg = ModelConfig.preset("tiny", dtype="bf16", expert_dtype="bf16", quant_sim=False)
    fused = dataclasses.replace(REFERENCE, **{name: counted(name) for name in calls})
    ref_model = init_random_(Transformer(cfg, dtype=torch.float32), 0).eval().to(TRITON_DEVICE)
    fused_model = Transformer(cfg, kernels=fused, dtype=torch.float32).eval().to(TRITON_DEVICE)
    fused_model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0)).to(TRITON_DEVICE)
    logits = []
    for model in (ref_model, fused_model):
        cache = model.new_cache(1, 32)
        with torch.no_grad():
            logits.append((model(ids[:, :5], cache, all_logits=True), model(ids[:, 5:], cache)))
    assert calls == {"hc_pre": 4 * cfg.n_layers, "hc_post": 4 * cfg.n_layers, "hc_head": 2}
    for ref, got in zip(*logits):
        spread = ref.std().item()
        assert spread > 0.1
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * spread)

"""The NPU backend on the torch_npu emulation equals the reference kernels, stage by stage and for whole
attention layers (window, CSA, HCA; prefill, decode, mixed lengths), and says when and why it falls back."""

import dataclasses
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from ascend.backends import get_kernels
from ascend.backends.npu import Fallbacks, NpuBackendError, make_kernels
from ascend.npu_emulation import SchemaUnavailable, emulated_torch_npu, installed
from model.kernels import REFERENCE

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def emulation():
    try:
        emulated_torch_npu()
    except SchemaUnavailable as e:
        pytest.skip(f"torch-npu wheel unreachable, so no operator schemas: {e}")
    with installed() as module:
        yield module


def npu_kernels(soc):
    fallbacks = Fallbacks()
    return make_kernels(soc, fallbacks=fallbacks), fallbacks


def assert_rel(a, b, dtype):
    """Relative Frobenius error within the dtype's tolerance."""
    a, b = a.double(), b.double()
    err = (a - b).norm() / b.norm().clamp(min=1e-12)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


def stage_ran_on_npu(fallbacks, stage):
    return not any(s == stage for s, _ in fallbacks.reasons)


# ------------------------------------------------------------------------------------- kernel by kernel

@pytest.mark.parametrize("soc,dtype", [("A3", torch.bfloat16), ("A5", torch.float32), ("A5", torch.bfloat16)])
def test_rms_norm_and_rope(emulation, soc, dtype):
    k, fb = npu_kernels(soc)
    x = torch.randn(2, 5, 4, 192).to(dtype)
    ang = torch.rand(2, 5, 32) * 6
    for weight in (None, torch.randn(192), torch.randn(192).to(dtype)):
        assert_rel(k.rms_norm(x, weight, 1e-6), REFERENCE.rms_norm(x, weight, 1e-6), dtype)
    for xx in (x, x[:, :, 0]):  # with and without a head dim
        for inverse in (False, True):
            assert_rel(k.rope(xx, ang.cos(), ang.sin(), inverse), REFERENCE.rope(xx, ang.cos(), ang.sin(), inverse), dtype)
    assert stage_ran_on_npu(fb, "rms_norm") and stage_ran_on_npu(fb, "rope")


@pytest.mark.parametrize("soc", ["A2", "A5"])
def test_gate_topk_score_and_hash_routing(emulation, soc):
    k, fb = npu_kernels(soc)
    logits, bias = torch.randn(9, 32) * 2, torch.randn(32) * 0.5
    w, idx = k.gate_topk(logits, bias, None, None, 6, 2.5)
    rw, ridx = REFERENCE.gate_topk(logits, bias, None, None, 6, 2.5)
    order, rorder = idx.argsort(-1), ridx.argsort(-1)
    assert torch.equal(idx.gather(-1, order), ridx.gather(-1, rorder)) and idx.dtype == torch.int64
    assert_rel(w.gather(-1, order), rw.gather(-1, rorder), torch.float32)
    tid2eid, ids = torch.randint(0, 32, (100, 6)), torch.randint(0, 100, (9,))
    w, idx = k.gate_topk(logits, None, tid2eid, ids, 6, 2.5)
    rw, ridx = REFERENCE.gate_topk(logits, None, tid2eid, ids, 6, 2.5)
    assert torch.equal(idx, ridx)
    assert_rel(w, rw, torch.float32)
    assert stage_ran_on_npu(fb, "gate_topk")


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_expert_matmul_through_grouped_matmul(emulation, fmt):
    """The static MoE path's per-selection expert matmul as one npu_grouped_matmul over the selections sorted by
    expert: bf16 experts as they are, int8 experts pseudo-quantised per channel; other ranks' selections (-1) give
    zeros; equal to the reference within the bf16 tolerance. FP4 experts (the published format) fall back."""
    from model import quant

    k, fb = npu_kernels("A3")
    stored = [quant.quantize_weight(torch.randn(48, 64) / 8, fmt) for _ in range(5)]
    weight = torch.stack([w for w, _ in stored])
    scale = torch.stack([s for _, s in stored]) if fmt == "int8" else None
    x = torch.randn(11, 64).bfloat16()
    idx = torch.tensor([3, -1, 0, 3, 4, -1, 1, 3, 0, 2, 4])
    y = k.expert_matmul(x, weight, scale, fmt, idx)
    assert stage_ran_on_npu(fb, "expert_matmul") and y.dtype == torch.bfloat16
    assert (y[idx < 0] == 0).all()
    assert_rel(y, REFERENCE.expert_matmul(x, weight, scale, fmt, idx), torch.bfloat16)
    groups = k.group_experts(idx, 5, fmt)                 # one grouping for a layer's three calls: the same output
    assert groups is not None and len(groups) == 2
    assert torch.equal(k.expert_matmul(x, weight, scale, fmt, idx, groups), y)
    assert k.group_experts(idx, 5, "fp4") is None
    w4, s4 = quant.quantize_weight(torch.randn(48, 64), "fp4")
    k.expert_matmul(x, w4[None], s4[None], "fp4", torch.zeros(11, dtype=torch.long))
    assert fb.reasons[-1][0] == "expert_matmul" and "not fp4" in fb.reasons[-1][1]


def test_int8_projections_through_weight_quant_batchmatmul(emulation):
    """`linear` on A3: int8 weights through npu_weight_quant_batchmatmul (per-channel scales, transposed weight),
    bf16 weights as one plain matmul, both equal to the reference; fp8 weights fall back, saying why. The grouped
    output projection (`grouped_linear`, wo_a) with int8 weights through npu_grouped_matmul, one group each."""
    from model import quant

    k, fb = npu_kernels("A3")
    x = torch.randn(2, 3, 64).bfloat16()
    for fmt in ("int8", "bf16"):
        w, s = quant.quantize_weight(torch.randn(40, 64) / 8, fmt)
        y = k.linear(x, w, s, fmt)
        assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
        assert_rel(y, REFERENCE.linear(x, w, s, fmt), torch.bfloat16)
    assert stage_ran_on_npu(fb, "linear")
    w8, s8 = quant.quantize_weight(torch.randn(128, 128), "fp8")
    k.linear(torch.randn(1, 128).bfloat16(), w8, s8, "fp8")
    assert fb.reasons[-1][0] == "linear" and "no fp8 weight matmul wired on A3" in fb.reasons[-1][1]
    xg = torch.randn(2, 3, 4, 64).bfloat16()                  # wo_a: 4 groups of 64 inputs -> 4 x 40 outputs
    for fmt in ("int8", "bf16"):
        w, s = quant.quantize_weight(torch.randn(4 * 40, 64) / 8, fmt)
        y = k.grouped_linear(xg, w, s, fmt)
        assert y.shape == (2, 3, 4, 40)
        assert_rel(y, REFERENCE.grouped_linear(xg, w, s, fmt), torch.bfloat16)
    assert stage_ran_on_npu(fb, "grouped_linear")


def test_moe_layer_static_path_on_npu_equals_reference(emulation):
    """A whole MoE layer with int8 experts (the A2/A3 conversion target), static path, NPU kernels (routing through
    npu_moe_gating_top_k, experts through npu_grouped_matmul, the int8 shared expert through
    npu_weight_quant_batchmatmul) against the reference layer on the same weights."""
    from model.config import ModelConfig
    from model.kernels import use_kernels
    from model.moe import MoE
    from model.transformer import init_random_

    cfg = ModelConfig.preset("tiny", expert_dtype="int8", dtype="int8")
    k, fb = npu_kernels("A3")
    layers = [init_random_(MoE(3, cfg), seed=4), use_kernels(init_random_(MoE(3, cfg), seed=4), k)]
    assert layers[1].shared_experts.w1.kernels is k
    for moe in layers:
        moe.mode = "static"
    x = torch.randn(2, 5, cfg.dim).bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        want, got = (moe(x, ids) for moe in layers)
    assert all(stage_ran_on_npu(fb, stage) for stage in ("expert_matmul", "gate_topk", "linear"))
    assert_rel(got, want, torch.bfloat16)


@pytest.mark.parametrize("soc,fmt,grouped", [("A3", "int8", True), ("A2", "bf16", True), ("A3", "fp4", False),
                                              ("A5", "int8", False)])
def test_prefill_moe_runs_static_where_grouped_matmul_serves_the_experts(emulation, soc, fmt, grouped, monkeypatch):
    """Where npu_grouped_matmul takes the experts' format (A2/A3: bf16, int8), the table declares it grouped, so a
    prefill-sized MoE input runs the static path (one grouped call per projection, no per-expert host sync) and
    equals the reference layer; FP4 experts and SoCs without the operator keep the dynamic path at that size."""
    from model.config import ModelConfig
    from model.kernels import use_kernels
    from model.moe import STATIC_MAX_SELECTIONS, MoE
    from model.transformer import init_random_

    cfg = ModelConfig.preset("tiny", expert_dtype=fmt)
    k, fb = npu_kernels(soc)
    assert (fmt in k.grouped_expert_formats) == grouped
    moe = use_kernels(init_random_(MoE(3, cfg), seed=5), k)
    tokens = STATIC_MAX_SELECTIONS // cfg.n_activated_experts + 7          # past the decode-size limit
    assert moe.use_static(tokens * cfg.n_activated_experts) == grouped
    if not grouped:
        return
    monkeypatch.setattr(MoE, "routed", lambda *a: pytest.fail("a declared grouped format took the dynamic path"))
    x = torch.randn(1, tokens, cfg.dim).bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    want_layer = init_random_(MoE(3, cfg), seed=5)
    want_layer.mode = "static"                                             # the reference kernels, same weights
    with torch.no_grad():
        got, want = moe(x, ids), want_layer(x, ids)
    assert stage_ran_on_npu(fb, "expert_matmul")
    assert_rel(got, want, torch.bfloat16)


def test_mhc_stages_on_ascend_950(emulation):
    k, fb = npu_kernels("A5")
    dtype = torch.bfloat16
    x = torch.randn(2, 3, 4, 64).to(dtype)
    fn, scale, base = torch.randn(24, 256) * 0.1, torch.rand(3) + 0.5, torch.randn(24) * 0.1
    for got, want in zip(k.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6), REFERENCE.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)):
        assert_rel(got, want, dtype)
    mixes = torch.randn(2, 3, 24)
    for got, want in zip(k.sinkhorn(mixes, scale, base, 20, 1e-6), REFERENCE.sinkhorn(mixes, scale, base, 20, 1e-6)):
        assert_rel(got, want, torch.float32)
    _, post, comb = REFERENCE.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    y = torch.randn(2, 3, 64).to(dtype)
    assert_rel(k.hc_post(y, x, post, comb), REFERENCE.hc_post(y, x, post, comb), dtype)
    hfn, hscale, hbase = torch.randn(4, 256) * 0.1, torch.rand(1), torch.randn(4)
    assert_rel(k.hc_head(x, hfn, hscale, hbase, 1e-6, 1e-6), REFERENCE.hc_head(x, hfn, hscale, hbase, 1e-6, 1e-6), dtype)
    assert all(stage_ran_on_npu(fb, s) for s in ("hc_pre", "hc_post", "hc_head", "sinkhorn"))


def test_indexer_topk_selects_the_reference_entries(emulation):
    k, fb = npu_kernels("A3")
    B, S, H, T = 2, 6, 4, 37
    q, keys = torch.randn(B, S, H, 128).bfloat16(), torch.randn(B, T, 128).bfloat16()
    weights = torch.rand(B, S, H) + 0.1
    n_visible = torch.tensor([[0, 1, 5, 9, 20, 37], [3, 3, 3, 4, 30, 36]])
    for topk in (4, 40):  # fewer and more slots than visible entries
        got, want = k.indexer_topk(q, keys, weights, n_visible, topk), REFERENCE.indexer_topk(q, keys, weights, n_visible, topk)
        assert got.shape == want.shape == (B, S, topk) and got.dtype == torch.int32
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert stage_ran_on_npu(fb, "indexer_topk")


def test_indexer_topk_without_keys_selects_nothing(emulation):
    """A cache shorter than one compressed block has no indexer keys: every slot -1, through the reference, and
    the fallback says why."""
    k, fb = npu_kernels("A3")
    q, keys, weights = torch.randn(2, 1, 4, 128).bfloat16(), torch.randn(2, 0, 128).bfloat16(), torch.rand(2, 1, 4)
    got = k.indexer_topk(q, keys, weights, torch.zeros(2, 1, dtype=torch.int64), 4)
    assert torch.equal(got, torch.full((2, 1, 4), -1, dtype=torch.int32))
    assert ("indexer_topk", "no keys to index (a cache shorter than one compressed block)") in fb.reasons


@pytest.mark.parametrize("heads", [1, 3, 8])     # Ascend 950 takes any head count up to 128 (A2/A3: powers of 2)
def test_sparse_attn_with_sinks_and_empty_slots(emulation, heads):
    k, fb = npu_kernels("A5")
    B, S, T, K = 2, 3, 20, 7
    q, kv = (torch.randn(B, S, heads, 512) * 0.05).bfloat16(), torch.randn(B, T, 512).bfloat16()
    idx = torch.randint(0, T, (B, S, K), dtype=torch.int32)
    idx[0, 0, ::2] = -1        # -1 between valid slots: the backend must move them to the end
    idx[1, 2] = -1             # a query with nothing to attend: zeros
    sink = torch.randn(heads)
    got, want = k.sparse_attn(q, kv, idx, sink, 512 ** -0.5), REFERENCE.sparse_attn(q, kv, idx, sink, 512 ** -0.5)
    assert_rel(got, want, torch.bfloat16)
    assert got[1, 2].abs().max() == 0
    assert stage_ran_on_npu(fb, "sparse_attn")


def test_npu_stages_trace_with_fake_tensors(emulation):
    """Every NPU stage runs under FakeTensorMode (operators through their Meta kernels): no value-dependent shape and
    no host read (.item(), .tolist()) on the NPU path, so it can be graph-captured. Shapes equal the reference's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a3, a5 = npu_kernels("A3")[0], npu_kernels("A5")[0]
    bf = torch.bfloat16
    with FakeTensorMode():
        q, kv, sink = torch.randn(2, 3, 8, 512, dtype=bf), torch.randn(2, 20, 512, dtype=bf), torch.randn(8)
        idx = torch.zeros(2, 3, 7, dtype=torch.int32)
        qi, ki, w = torch.randn(2, 3, 4, 128, dtype=bf), torch.randn(2, 37, 128, dtype=bf), torch.randn(2, 3, 4)
        x, fn = torch.randn(2, 3, 4, 64, dtype=bf), torch.randn(24, 256)
        calls = [
            ("sparse_attn", a5, (q, kv, idx, sink, 0.1)),
            ("indexer_topk", a3, (qi, ki, w, torch.zeros(2, 3, dtype=torch.int64), 4)),
            ("gate_topk", a3, (torch.randn(5, 16), torch.randn(16), None, None, 3, 1.5)),
            ("gate_topk", a3, (torch.randn(5, 16), None, torch.zeros(9, 3, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), 3, 1.5)),
            ("rope", a3, (q, torch.randn(2, 3, 32), torch.randn(2, 3, 32))),
            ("rms_norm", a3, (q, torch.randn(512), 1e-6)),
            ("hc_pre", a5, (x, fn, torch.rand(3), torch.randn(24), 20, 1e-6, 1e-6)),
            ("hc_post", a5, (x[:, :, 0], x, torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4))),
            ("hc_head", a5, (x, fn[:4], torch.rand(1), torch.randn(4), 1e-6, 1e-6)),
        ]
        for stage, kernels, args in calls:
            got, want = getattr(kernels, stage)(*args), getattr(REFERENCE, stage)(*args)
            for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert (g.shape, g.dtype) == (r.shape, r.dtype), stage


# ------------------------------------------------------------------------------------------- fallbacks

def test_fallbacks_name_the_stage_and_reason_once(emulation, caplog):
    caplog.set_level(logging.WARNING, logger="ascend.backends.npu")
    k, fb = npu_kernels("A3")
    messages = [r.getMessage() for r in caplog.records]
    assert any("sparse_attn" in m and "takes no sinks on A3" in m for m in messages)
    assert any("hc_pre" in m and "npu_mhc_pre" in m and "not available on A3" in m for m in messages)
    assert k.sparse_attn is REFERENCE.sparse_attn and k.hc_pre is REFERENCE.hc_pre
    k2, fb2 = npu_kernels("A5")
    a2, fb_a2 = npu_kernels("A2")
    caplog.clear()
    q, kv = torch.randn(1, 2, 4, 128), torch.randn(1, 5, 128)
    idx = torch.zeros(1, 2, 3, dtype=torch.int32)
    for _ in range(3):  # fp32 and head dim 128: the operator's limits are not met, every call
        torch.testing.assert_close(k2.sparse_attn(q, kv, idx, torch.zeros(4), 0.1), REFERENCE.sparse_attn(q, kv, idx, torch.zeros(4), 0.1))
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["npu backend: sparse_attn runs the reference implementation: "
                      "npu_sparse_flash_attention needs head dim 512, got 128"]
    assert fb2.reasons[-1] == ("sparse_attn", "npu_sparse_flash_attention needs head dim 512, got 128")
    a2.rope(torch.randn(1, 2, 64), torch.zeros(1, 2, 32), torch.ones(1, 2, 32))
    assert ("rope", "npu_interleave_rope on A2 takes float16/bfloat16, got float32") in fb_a2.reasons


def test_get_kernels_by_device_type(emulation):
    assert get_kernels(SimpleNamespace(type="cpu")) is REFERENCE
    k = get_kernels(SimpleNamespace(type="npu", soc="A5"))
    assert k.sparse_attn.__name__ == "npu_sparse_attn" and k.hc_pre.__name__ == "npu_hc_pre"
    a3 = get_kernels(SimpleNamespace(type="npu", soc="A3"))
    assert a3.sparse_attn is REFERENCE.sparse_attn and a3.hc_pre is REFERENCE.hc_pre
    cuda = get_kernels(SimpleNamespace(type="cuda"))  # imported by name only now; PyTorch stages without a GPU
    assert cuda.sparse_attn is not REFERENCE.sparse_attn and cuda.gate_topk is REFERENCE.gate_topk


def test_npu_backend_without_torch_npu_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` now raises ImportError
    with pytest.raises(NpuBackendError, match="the npu backend needs torch_npu"):
        get_kernels(SimpleNamespace(type="npu", soc="A3"))


# ------------------------------------------------------------------------------ whole attention layers

def _layer(config, layer_id, kernels, seed=0):
    from model.attention import Attention

    torch.manual_seed(seed)
    attn = Attention(config, layer_id, kernels=kernels)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape) * (1.0 if "norm" in name or "sink" in name else p.shape[-1] ** -0.5))
    return attn


class ReplayedSelection:
    """The NPU indexer's choices, replayed into the reference layer once checked to be a top-k of the reference
    scores. Indexer scores tie exactly (ReLU zeros, FP4-simulated queries and keys), and equal scores may be
    chosen either way; replaying the checked choice lets the rest of the two layers be compared exactly."""

    def __init__(self, npu_topk):
        self.npu_topk, self.chosen = npu_topk, []

    def npu(self, *args, **kwargs):
        self.chosen.append(self.npu_topk(*args, **kwargs))
        return self.chosen[-1]

    def reference(self, q, k, weights, n_visible, topk, group=None):
        got = self.chosen.pop(0)
        scores = (torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu() * weights.float()[..., None]).sum(2)
        tol = 2e-2 * scores.abs().amax().item()  # the two layers' queries differ by bf16 rounding
        for b in range(got.shape[0]):
            for s in range(got.shape[1]):
                n = int(n_visible[b, s].clamp(max=k.shape[1]))
                chosen = got[b, s][got[b, s] >= 0].long()
                assert len(chosen) == len(set(chosen.tolist())) == min(topk, n) and (chosen < n).all()
                rest = torch.ones(n, dtype=torch.bool)
                rest[chosen] = False
                if rest.any() and len(chosen):
                    assert scores[b, s, chosen].min() >= scores[b, s, :n][rest].max() - tol
        return got


@pytest.mark.parametrize("soc", ["A3", "A5"])    # A3: sparse attention on the reference (no sinks there); A5: fused
@pytest.mark.parametrize("layer_id,kind", [(0, "window"), (1, "CSA"), (2, "HCA")])
def test_attention_layer_npu_equals_reference(emulation, layer_id, kind, soc):
    pytest.importorskip("model.attention")
    from model.cache import LayerCache
    from model.config import ModelConfig

    config = ModelConfig.preset("tiny", head_dim=512, dtype="bf16")  # the fused attention ops need 512-dim heads
    dtype = torch.bfloat16
    k, fb = npu_kernels(soc)
    replay = ReplayedSelection(k.indexer_topk)
    reference = dataclasses.replace(REFERENCE, indexer_topk=replay.reference)
    ref_layer = _layer(config, layer_id, reference)
    npu_layer = _layer(config, layer_id, dataclasses.replace(k, indexer_topk=replay.npu))
    B, S = 2, 136                       # past one HCA block (128) and the window (16)
    n_valid = torch.tensor([S, S - 7])  # mixed lengths
    caches = [LayerCache(config, layer_id, B, 256, dtype) for _ in range(2)]
    start = torch.zeros(B, dtype=torch.int64)
    x = torch.randn(B, S, config.dim).to(dtype)
    with torch.no_grad():
        npu_out, ref_out = (layer(x, start, cache, n_valid) for layer, cache in ((npu_layer, caches[1]), (ref_layer, caches[0])))
        for b in range(B):
            assert_rel(npu_out[b, :n_valid[b]], ref_out[b, :n_valid[b]], dtype)
        start = start + n_valid
        for _ in range(3):              # decode steps at different positions per sequence
            x = torch.randn(B, 1, config.dim).to(dtype)
            npu_out, ref_out = (layer(x, start, cache) for layer, cache in ((npu_layer, caches[1]), (ref_layer, caches[0])))
            assert_rel(npu_out, ref_out, dtype)
            start = start + 1
    assert stage_ran_on_npu(fb, "rope") and stage_ran_on_npu(fb, "rms_norm")
    assert stage_ran_on_npu(fb, "sparse_attn") == (soc == "A5")
    if kind == "CSA" and soc == "A3":
        assert stage_ran_on_npu(fb, "indexer_topk") and not replay.chosen


class ReplayedRouting:
    """As ReplayedSelection, for MoE routing: the NPU gate's experts are checked to be a top-k of the reference
    (score + bias) (or the hash table's row), then the reference layer weights them with its own scores."""

    def __init__(self, npu_gate):
        self.npu_gate, self.chosen = npu_gate, []

    def npu(self, *args):
        out = self.npu_gate(*args)
        self.chosen.append(out[1])
        return out

    def reference(self, logits, bias, tid2eid, input_ids, topk, route_scale):
        idx = self.chosen.pop(0)
        score = torch.nn.functional.softplus(logits.float()).sqrt()
        if tid2eid is not None:
            assert torch.equal(idx, tid2eid[input_ids].long())
        else:
            choice = score + bias.float() if bias is not None else score
            chosen = choice.gather(-1, idx)
            rest = choice.scatter(-1, idx, float("-inf"))
            assert (chosen.min(-1).values >= rest.max(-1).values - 2e-2 * choice.abs().amax()).all()
        w = score.gather(-1, idx)
        return w / w.sum(-1, keepdim=True) * route_scale, idx


@pytest.mark.parametrize("soc", ["A3", "A5"])
def test_transformer_npu_equals_reference(emulation, soc):
    """Whole tiny model (4 layers: window, CSA, HCA, CSA; MoE with a hash layer; mHC; MTP block): logits of a
    mixed-length prefill and of decode steps. A3 runs attention on the fused ops, A5 the mHC stages. The FP8/FP4
    round-trip simulations are off here: across layers they turn bf16-level differences into whole FP4 steps of
    the indexer queries, which is a property of the simulation, not of the kernels under test."""
    transformer = pytest.importorskip("model.transformer")
    from model.config import ModelConfig

    config = ModelConfig.preset("tiny", head_dim=512, dtype="bf16", quant_sim=False)
    k, fb = npu_kernels(soc)
    select, route = ReplayedSelection(k.indexer_topk), ReplayedRouting(k.gate_topk)
    npu_k = dataclasses.replace(k, indexer_topk=select.npu, gate_topk=route.npu)
    ref_k = dataclasses.replace(REFERENCE, indexer_topk=select.reference, gate_topk=route.reference)
    models = [transformer.init_random_(transformer.Transformer(config, kernels=kk), seed=3) for kk in (npu_k, ref_k)]
    caches = [m.new_cache(2, 64) for m in models]
    ids = torch.randint(0, config.vocab_size, (2, 24))
    n_valid = torch.tensor([24, 17])
    with torch.no_grad():
        npu_logits, ref_logits = (m(ids, c, n_valid) for m, c in zip(models, caches))
        assert_rel(npu_logits, ref_logits, torch.bfloat16)
        for _ in range(2):
            step = torch.randint(0, config.vocab_size, (2, 1))
            npu_logits, ref_logits = (m(step, c) for m, c in zip(models, caches))
            assert_rel(npu_logits, ref_logits, torch.bfloat16)
    assert not select.chosen and not route.chosen
    npu_stages = {"A3": ("indexer_topk", "rope", "rms_norm", "gate_topk"),
                  "A5": ("sparse_attn", "hc_pre", "hc_post", "hc_head", "rope", "rms_norm", "gate_topk")}[soc]
    assert all(stage_ran_on_npu(fb, s) for s in npu_stages), fb.reasons

"""Reference kernels against naive per-element loops written independently from the vectorised bodies."""

import collections
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model import kernels as K


def test_table_defaults_and_replace():
    assert K.REFERENCE.sparse_attn is K.sparse_attn
    fake = dataclasses.replace(K.REFERENCE, rms_norm=lambda x, w, eps: x)
    assert fake.rms_norm(torch.ones(2), None, 1e-6) is not None and fake.rope is K.rope
    with pytest.raises(dataclasses.FrozenInstanceError):
        K.REFERENCE.rope = None


def test_rms_norm():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w = torch.randn(8)
    y = K.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    for i in range(2):
        for j in range(3):
            v = x[i, j].double()
            ref = v / math.sqrt(float((v * v).mean()) + 1e-6) * w.double()
            torch.testing.assert_close(y[i, j].double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(K.rms_norm(x.float(), None, 1e-6).norm(dim=-1), torch.full((2, 3), 8 ** 0.5))


def test_rope_pairs_and_inverse():
    b, s, h, d, r = 2, 3, 2, 10, 6
    x = torch.randn(b, s, h, d)
    ang = torch.randn(b, s, r // 2)
    y = K.rope(x, ang.cos(), ang.sin())
    for bi in range(b):
        for si in range(s):
            for hi in range(h):
                v = x[bi, si, hi]
                ref = v.clone()
                for k in range(r // 2):
                    a = float(ang[bi, si, k])
                    x0, x1 = float(v[d - r + 2 * k]), float(v[d - r + 2 * k + 1])
                    ref[d - r + 2 * k] = x0 * math.cos(a) - x1 * math.sin(a)
                    ref[d - r + 2 * k + 1] = x0 * math.sin(a) + x1 * math.cos(a)
                torch.testing.assert_close(y[bi, si, hi], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(K.rope(y, ang.cos(), ang.sin(), inverse=True), x, atol=1e-5, rtol=1e-5)
    # 3-D input (one vector per token) uses the same table
    torch.testing.assert_close(K.rope(x[:, :, 0], ang.cos(), ang.sin()), y[:, :, 0])


def test_hadamard_matches_sylvester_matrix():
    d = 16
    h = torch.ones(1, 1)
    while h.size(0) < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, 5, d)
    torch.testing.assert_close(K.hadamard(x), x @ h / 4, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(K.hadamard(K.hadamard(x)), x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        K.hadamard(torch.randn(2, 12))


def test_indexer_topk_against_loop():
    b, s, h, dk, t, topk = 2, 4, 3, 8, 6, 4
    q, k, w = torch.randn(b, s, h, dk), torch.randn(b, t, dk), torch.randn(b, s, h)
    n_vis = torch.tensor([[0, 1, 3, 6], [2, 5, 6, 4]])
    idx = K.indexer_topk(q, k, w, n_vis, topk)
    assert idx.dtype == torch.int32 and idx.shape == (b, s, topk)
    for bi in range(b):
        for si in range(s):
            score = [sum(float(w[bi, si, hh]) * max(0.0, float(q[bi, si, hh] @ k[bi, tt])) for hh in range(h))
                     for tt in range(int(n_vis[bi, si]))]
            want = sorted(range(len(score)), key=lambda tt: -score[tt])[:topk]
            got = idx[bi, si].tolist()
            assert sorted(x for x in got if x >= 0) == sorted(want)
            assert got.count(-1) == topk - len(want)
    # topk larger than the cache: padded with -1 to the fixed size
    wide = K.indexer_topk(q, k, w, n_vis, 9)
    assert wide.shape == (b, s, 9) and (wide[..., 6:] == -1).all()


def test_indexer_topk_breaks_ties_by_lowest_index():
    # Entries whose every head has a negative dot product score exactly 0 (ReLU), so ties at the top-k boundary
    # are common. torch.topk's choice among them depends on the other scores: swapping the two largest (both
    # selected either way) made it keep entry 7, then 6. The lowest tied index must win whatever the rest holds.
    def select(first: float, second: float) -> list[int]:
        keys = torch.tensor([-1.0, -2.0, first, 1.0, second, -1.0, -3.0, -1.0])   # relu -> 0, 0, x, 1, y, 0, 0, 0
        k = F.pad(keys[None, :, None], (0, 3))                                      # [1, T=8, Dk=4]
        q = F.pad(torch.ones(1, 1, 1, 1), (0, 3))                                   # q = e0, one head
        return sorted(K.indexer_topk(q, k, torch.ones(1, 1, 1), torch.tensor([[8]]), 4)[0, 0].tolist())

    assert select(3.0, 2.0) == select(2.0, 3.0) == [0, 2, 3, 4]
    # fewer positive scores than slots, and nothing visible: ties among zeros / -inf resolved the same way
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 10, 8)
    w = torch.randn(2, 3, 2)
    idx = K.indexer_topk(q, k, w, torch.tensor([[0, 3, 10], [10, 10, 1]]), 4)
    assert (idx[0, 0] == -1).all() and sorted(idx[0, 1].tolist()) == [-1, 0, 1, 2]
    assert sorted(idx[1, 2].tolist()) == [-1, -1, -1, 0]


def test_topk_lowest_index_against_stable_sort():
    g = torch.Generator().manual_seed(0)
    for t, n in ((5, 1), (12, 4), (100, 7), (1000, 64)):
        x = torch.randint(-3, 4, (6, t), generator=g).float()       # many exact ties
        x[0] = float("-inf")
        want = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :n]
        assert torch.equal(K.topk_lowest_index(x, n).sort(-1).values, want.sort(-1).values)


def test_sparse_attn_against_loop():
    b, s, h, d, t, k = 2, 3, 4, 8, 7, 5
    q, kv = torch.randn(b, s, h, d), torch.randn(b, t, d)
    idx = torch.randint(0, t, (b, s, k), dtype=torch.int32)
    idx[0, 1, 2:] = -1
    idx[1, 2, :] = -1                   # no key at all: zeros
    sink = torch.randn(h)
    out = K.sparse_attn(q, kv, idx, sink, 0.3)
    for bi in range(b):
        for si in range(s):
            for hh in range(h):
                rows = [int(j) for j in idx[bi, si] if j >= 0]
                e = [math.exp(0.3 * float(q[bi, si, hh] @ kv[bi, j])) for j in rows]
                den = sum(e) + math.exp(float(sink[hh]))
                ref = sum((ei / den * kv[bi, j] for ei, j in zip(e, rows)), torch.zeros(d))
                torch.testing.assert_close(out[bi, si, hh], ref, atol=1e-5, rtol=1e-5)
    assert (out[1, 2] == 0).all()


def test_sparse_attn_sink_lowers_mass():
    q, kv = torch.randn(1, 1, 2, 4), torch.ones(1, 3, 4)
    idx = torch.tensor([[[0, 1, 2]]], dtype=torch.int32)
    no_sink = K.sparse_attn(q, kv, idx, torch.full((2,), -1e4), 1.0)
    torch.testing.assert_close(no_sink, torch.ones(1, 1, 2, 4))
    with_sink = K.sparse_attn(q, kv, idx, torch.zeros(2), 1.0)
    assert (with_sink < 1).all() and (with_sink > 0).all()


def _naive_sinkhorn(m, scale, base, n, iters, eps):
    pre = [1 / (1 + math.exp(-(m[i] * scale[0] + base[i]))) + eps for i in range(n)]
    post = [2 / (1 + math.exp(-(m[n + i] * scale[1] + base[n + i]))) for i in range(n)]
    c = [[m[2 * n + r * n + j] * scale[2] + base[2 * n + r * n + j] for j in range(n)] for r in range(n)]
    for r in range(n):
        mx = max(c[r])
        e = [math.exp(v - mx) for v in c[r]]
        c[r] = [v / sum(e) + eps for v in e]
    for it in range(iters):
        if it > 0:
            for r in range(n):
                rs = sum(c[r])
                c[r] = [v / (rs + eps) for v in c[r]]
        for j in range(n):
            cs = sum(c[r][j] for r in range(n))
            for r in range(n):
                c[r][j] /= cs + eps
    return pre, post, c


def test_sinkhorn_against_loop():
    n = 4
    mixes = torch.randn(2, 3, (2 + n) * n)
    scale, base = torch.rand(3) + 0.5, torch.randn((2 + n) * n)
    pre, post, comb = K.sinkhorn(mixes, scale, base, 20, 1e-6)
    for i in range(2):
        for j in range(3):
            p, q, c = _naive_sinkhorn(mixes[i, j].tolist(), scale.tolist(), base.tolist(), n, 20, 1e-6)
            torch.testing.assert_close(pre[i, j], torch.tensor(p), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(post[i, j], torch.tensor(q), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(comb[i, j], torch.tensor(c), atol=1e-6, rtol=1e-5)
    # 20 rounds leave it (nearly) doubly stochastic
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 3, n), atol=2e-2, rtol=0)


def test_hc_pre_post_head_against_loop():
    b, s, n, d = 1, 2, 4, 6
    x = torch.randn(b, s, n, d)
    fn, scale, base = torch.randn((2 + n) * n, n * d), torch.rand(3), torch.randn((2 + n) * n)
    y, post, comb = K.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for si in range(s):
        v = x[0, si].flatten()
        m = (fn @ v) / torch.sqrt((v * v).mean() + 1e-6)
        p, q, c = _naive_sinkhorn(m.tolist(), scale.tolist(), base.tolist(), n, 20, 1e-6)
        torch.testing.assert_close(y[0, si], sum(p[k] * x[0, si, k] for k in range(n)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post[0, si], torch.tensor(q), atol=1e-5, rtol=1e-5)
        f = torch.randn(d)
        new = K.hc_post(f.view(1, 1, d), x[:, si:si + 1], post[:, si:si + 1], comb[:, si:si + 1])[0, 0]
        for jj in range(n):
            ref = q[jj] * f + sum(c[k][jj] * x[0, si, k] for k in range(n))
            torch.testing.assert_close(new[jj], ref, atol=1e-5, rtol=1e-5)
    hfn, hscale, hbase = torch.randn(n, n * d), torch.rand(1), torch.randn(n)
    head = K.hc_head(x, hfn, hscale, hbase, 1e-6, 1e-6)
    v = x[0, 1].flatten()
    m = (hfn @ v) / torch.sqrt((v * v).mean() + 1e-6)
    pre = torch.sigmoid(m * hscale + hbase) + 1e-6
    torch.testing.assert_close(head[0, 1], (pre[:, None] * x[0, 1]).sum(0), atol=1e-5, rtol=1e-5)


def test_gate_topk_scored_and_hash():
    n, e, k = 5, 8, 3
    logits, bias = torch.randn(n, e), torch.randn(e)
    w, idx = K.gate_topk(logits, bias, None, None, k, 2.5)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    for i in range(n):
        score = [math.sqrt(math.log1p(math.exp(float(v)))) for v in logits[i]]
        chosen = sorted(range(e), key=lambda j: -(score[j] + float(bias[j])))[:k]
        assert sorted(idx[i].tolist()) == sorted(chosen)
        tot = sum(score[j] for j in chosen)
        for slot, j in enumerate(idx[i].tolist()):
            assert abs(float(w[i, slot]) - score[j] / tot * 2.5) < 1e-5
    tid2eid = torch.randint(0, e, (11, k))
    ids = torch.tensor([3, 0, 10, 3, 7])
    w, idx = K.gate_topk(logits, None, tid2eid, ids, k, 1.5)
    assert torch.equal(idx, tid2eid[ids])
    s = F.softplus(logits).sqrt().gather(1, idx)
    torch.testing.assert_close(w, s / s.sum(1, keepdim=True) * 1.5)


def test_sparse_attn_long_chunk_in_query_blocks():
    b, s, h, d, t, k = 1, K._QUERY_BLOCK + 7, 2, 4, 9, 3
    q, kv, sink = torch.randn(b, s, h, d), torch.randn(b, t, d), torch.randn(h)
    idx = torch.randint(-1, t, (b, s, k), dtype=torch.int32)
    whole = K.sparse_attn(q, kv, idx, sink, 0.5)
    for i in (0, K._QUERY_BLOCK - 1, K._QUERY_BLOCK, s - 1):
        torch.testing.assert_close(whole[:, i:i + 1], K.sparse_attn(q[:, i:i + 1], kv, idx[:, i:i + 1], sink, 0.5))


@pytest.mark.parametrize("fmt", ["fp4", "fp8", "int8", "bf16", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_matmul_against_per_row_dequantised_matmul(fmt, dtype):
    """Stacked stored weights picked per row == each expert dequantised alone (model.quant), one matvec per row;
    ragged FP8 blocks (out 136, in 160) and repeated experts included."""
    from model import quant
    g = torch.Generator().manual_seed(3)
    n_experts, d_out, d_in = 4, 136, 160
    stored = [quant.quantize_weight(torch.randn(d_out, d_in, generator=g) / 4, fmt) for _ in range(n_experts)]
    weight = torch.stack([w for w, _ in stored])
    scale = None if stored[0][1] is None else torch.stack([s for _, s in stored])
    x = torch.randn(7, d_in, generator=g).to(dtype)
    idx = torch.tensor([2, 0, 2, 3, 1, 1, 2])
    y = K.expert_matmul(x, weight, scale, fmt, idx)
    assert y.shape == (7, d_out) and y.dtype == dtype
    for row, e in enumerate(idx.tolist()):
        w = quant.dequantize_weight(*stored[e], fmt, torch.float64)
        want = w @ x[row].double()
        torch.testing.assert_close(y[row].double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=5e-2 if dtype == torch.bfloat16 else 1e-5)


def test_use_kernels_reaches_every_holder_including_mhc_helpers():
    """A model built with one table and switched with `use_kernels` runs every stage from the new table: modules
    and the plain mHC helpers they hold (HyperConnection, HyperHead), as a run shows."""
    from model.config import ModelConfig
    from model.transformer import Transformer, init_random_

    calls = collections.Counter()

    def counted(name):
        fn = getattr(K.REFERENCE, name)
        return lambda *a, **k: calls.update([name]) or fn(*a, **k)

    model = init_random_(Transformer(ModelConfig.preset("tiny"), dtype=torch.float32))
    names = ("hc_pre", "hc_post", "hc_head", "rms_norm", "linear", "f32_linear", "grouped_linear", "gate_topk",
             "fp8_round_trip", "fp4_round_trip")
    K.use_kernels(model, dataclasses.replace(K.REFERENCE, **{n: counted(n) for n in names}))
    model(torch.tensor([[3, 4, 5]]), model.new_cache(1, 8))
    n_blocks = model.config.n_layers
    assert calls["hc_pre"] == calls["hc_post"] == 2 * n_blocks and calls["hc_head"] == 1
    assert all(calls[n] > 0 for n in names), calls


def test_expert_matmul_negative_ids_select_nothing():
    """The static MoE path marks another rank's selections with expert -1: those rows are zeros, the others are
    dequant(weight[e]) @ x as a per-row matmul computes them."""
    from model import quant
    w, s = zip(*(quant.quantize_weight(torch.randn(16, 64), "fp8") for _ in range(3)))
    weight, scale = torch.stack(w), torch.stack(s)
    x = torch.randn(5, 64)
    idx = torch.tensor([2, -1, 0, -1, 1])
    y = K.expert_matmul(x, weight, scale, "fp8", idx)
    for n, e in enumerate(idx.tolist()):
        want = torch.zeros(16) if e < 0 else quant.dequantize_weight(weight[e], scale[e], "fp8", torch.float32) @ x[n]
        torch.testing.assert_close(y[n], want, rtol=1e-5, atol=1e-5)

"""The torch_npu emulation: schemas from the real wheel bind arguments like the real operators, and every
emulated operator equals an independent, loop-by-loop computation of its documented formula."""

import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ascend.npu_emulation import EMULATED, SchemaUnavailable, emulated_torch_npu, installed
from ascend.npu_emulation import schemas
from ascend.npu_emulation.schemas import load_schemas


@pytest.fixture(scope="module")
def tnpu():
    try:
        return emulated_torch_npu()
    except SchemaUnavailable as e:
        pytest.skip(f"torch-npu wheel unreachable, so no operator schemas: {e}")


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- schemas and binding

def test_schemas_come_from_the_wheel(tnpu):
    schemas = load_schemas()
    assert len(schemas) > 300  # the whole codegen yaml, not a hand-written list
    for name in EMULATED:
        parsed = torch._C.parse_schema(schemas[name])
        assert parsed.name == name
        op = getattr(tnpu, name)
        assert str(op.default._schema).split("(", 1)[1] == str(parsed).split("(", 1)[1]


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCEND_DEPLOY_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for torch-npu==2.14.0\n")
    monkeypatch.setattr(schemas.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(SchemaUnavailable, match="cannot download torch-npu==2.14.0 .*No matching distribution"):
        schemas.schema_yaml_path()


def test_schema_yaml_is_extracted_from_the_wheel(tmp_path, monkeypatch):
    """Only the codegen yaml leaves the downloaded wheel, into the cache directory."""
    monkeypatch.setenv("ASCEND_DEPLOY_CACHE", str(tmp_path / "cache"))
    body = "custom:\n- func: npu_x(Tensor self) -> Tensor\n"

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl", "w") as z:
            z.writestr(schemas.YAML_IN_WHEEL, body)
            z.writestr("torch_npu/other.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(schemas.subprocess, "run", fake_pip)
    path = schemas.schema_yaml_path()
    assert path.read_text() == body and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _valid_calls():
    bf = torch.bfloat16
    x4 = torch.randn(1, 2, 4, 32, dtype=bf)
    return {
        "npu_rms_norm": ((torch.randn(2, 8), torch.ones(8)), {"epsilon": 1e-6}),
        "npu_interleave_rope": ((torch.randn(1, 2, 3, 64), torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64)), {}),
        "npu_moe_gating_top_k": ((torch.randn(3, 8), 2), {"norm_type": 1}),
        "npu_grouped_matmul": (([torch.randn(5, 16, dtype=bf)], [torch.randn(3, 16, 8, dtype=bf)]),
                               {"group_list": torch.tensor([2, 2, 5]), "split_item": 3, "group_type": 0}),
        "npu_weight_quant_batchmatmul": ((torch.randn(3, 16, dtype=bf), torch.randint(-9, 9, (16, 8), dtype=torch.int8),
                                          torch.rand(8, dtype=bf)), {}),
        "npu_mhc_pre": ((x4, torch.randn(24, 128), torch.ones(3), torch.zeros(24)), {"hc_eps": 1e-6}),
        "npu_mhc_post": ((x4, torch.rand(1, 2, 4, 4), torch.randn(1, 2, 32, dtype=bf), torch.rand(1, 2, 4)), {}),
        "npu_mhc_sinkhorn": ((torch.randn(3, 4, 4),), {"num_iters": 5}),
        "npu_lightning_indexer": ((torch.randn(1, 2, 4, 128, dtype=bf), torch.randn(1, 6, 1, 128, dtype=bf),
                                   torch.randn(1, 2, 4)), {"sparse_count": 3}),
        "npu_quant_lightning_indexer": ((torch.randint(-9, 9, (1, 2, 4, 128), dtype=torch.int8),
                                         torch.randint(-9, 9, (1, 6, 1, 128), dtype=torch.int8), torch.rand(1, 2, 4).half(),
                                         torch.rand(1, 2, 4).half(), torch.rand(1, 6, 1).half(), 0, 0), {"sparse_count": 3}),
        "npu_sparse_flash_attention": ((torch.randn(1, 2, 2, 512, dtype=bf), torch.randn(1, 5, 1, 512, dtype=bf),
                                        torch.randn(1, 5, 1, 512, dtype=bf), torch.zeros(1, 2, 1, 3, dtype=torch.int32), 0.1),
                                       {"query_rope": torch.randn(1, 2, 2, 64, dtype=bf),
                                        "key_rope": torch.randn(1, 5, 1, 64, dtype=bf), "attention_mode": 2}),
    }


@pytest.mark.parametrize("name", sorted(EMULATED))
def test_dispatcher_rejects_what_the_real_binding_rejects(tnpu, name):
    args, kwargs = _valid_calls()[name]
    op = getattr(tnpu, name)
    op(*args, **kwargs)  # the valid call goes through
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'not_an_argument'|expected at most"):
        op(*args, **kwargs, not_an_argument=1)
    with pytest.raises(RuntimeError, match="Expected a value of type"):
        op("not a tensor", *args[1:], **kwargs)
    with pytest.raises(RuntimeError, match="missing value for argument|expected at most"):
        op(*args[:-1], **kwargs)
    with pytest.raises(RuntimeError, match="expected at most"):  # too many positionals (kw-only ones included)
        op(*args, *([0] * 60))


@pytest.mark.parametrize("name", sorted(EMULATED))
def test_meta_kernels_agree_with_cpu_kernels(tnpu, name):
    args, kwargs = _valid_calls()[name]
    def to_meta(v):
        if isinstance(v, list):     # Tensor[] arguments
            return [to_meta(t) for t in v]
        return v.to("meta") if isinstance(v, torch.Tensor) else v

    cpu = getattr(tnpu, name)(*args, **kwargs)
    meta = getattr(tnpu, name)(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
    cpu, meta = (tuple(cpu), tuple(meta)) if isinstance(cpu, (tuple, list)) else ((cpu,), (meta,))
    assert [(t.shape, t.dtype) for t in meta] == [(t.shape, t.dtype) for t in cpu]


def test_installed_swaps_sys_modules_and_restores(tnpu, monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "torch_npu", sentinel)
    with installed() as module:
        import torch_npu
        assert torch_npu is module and torch_npu.__emulated__
        assert not hasattr(torch_npu, "npu_fused_infer_attention_score_v2")  # not emulated -> absent, not faked
    assert sys.modules["torch_npu"] is sentinel
    monkeypatch.delitem(sys.modules, "torch_npu")
    with installed():
        pass
    assert "torch_npu" not in sys.modules


def test_unemulated_modes_raise_not_silently_ignored(tnpu):
    args, kwargs = _valid_calls()["npu_sparse_flash_attention"]
    with pytest.raises(NotImplementedError, match="return_softmax_lse"):
        tnpu.npu_sparse_flash_attention(*args, **{**kwargs, "return_softmax_lse": True})
    with pytest.raises(NotImplementedError, match="attention_mode=0"):
        tnpu.npu_sparse_flash_attention(*args, **{**kwargs, "attention_mode": 0})
    with pytest.raises(NotImplementedError, match="out_flag=1"):
        tnpu.npu_mhc_sinkhorn(torch.randn(2, 4, 4), out_flag=1)
    args, kwargs = _valid_calls()["npu_lightning_indexer"]
    with pytest.raises(NotImplementedError, match="return_value"):
        tnpu.npu_lightning_indexer(*args, **kwargs, return_value=True)


def test_documented_limits_are_enforced(tnpu):
    with pytest.raises(RuntimeError, match="64"):
        tnpu.npu_interleave_rope(torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32))
    with pytest.raises(RuntimeError, match="D must be 128"):
        tnpu.npu_lightning_indexer(torch.randn(1, 1, 2, 64, dtype=torch.bfloat16), torch.randn(1, 3, 1, 64, dtype=torch.bfloat16),
                                   torch.randn(1, 1, 2), sparse_count=2)
    with pytest.raises(RuntimeError, match="sparse_count"):
        args, kwargs = _valid_calls()["npu_lightning_indexer"]
        tnpu.npu_lightning_indexer(*args, sparse_count=2500)
    with pytest.raises(RuntimeError, match="bf16/fp16"):
        tnpu.npu_mhc_post(torch.randn(1, 4, 32), None, torch.randn(1, 32), torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="renorm"):
        tnpu.npu_moe_gating_top_k(torch.randn(2, 8), 2, renorm=1)


# ------------------------------------------------------------------------- each op vs naive loops

def test_rms_norm(tnpu):
    x, g = torch.randn(3, 2, 16), torch.randn(2, 16)
    y, rstd = tnpu.npu_rms_norm(x, g, epsilon=1e-5)
    for i in range(3):
        ms = sum(v * v for v in x[i].flatten().tolist()) / 32
        assert rstd[i].item() == pytest.approx(1 / math.sqrt(ms + 1e-5), rel=1e-5)
        _close(y[i], x[i] / math.sqrt(ms + 1e-5) * g)
    assert rstd.shape == (3, 1, 1) and rstd.dtype == torch.float32
    xb = x.bfloat16()
    assert tnpu.npu_rms_norm(xb, g.bfloat16())[0].dtype == torch.bfloat16


def test_interleave_rope_is_a_complex_rotation_in_rotate_half_layout(tnpu):
    B, N, S = 2, 3, 4
    x = torch.randn(B, N, S, 64)
    ang = torch.randn(B, 1, S, 32)
    out = tnpu.npu_interleave_rope(x, torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))
    z = torch.view_as_complex(x.unflatten(-1, (32, 2)).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    _close(out[..., :32], z.real)
    _close(out[..., 32:], z.imag)


def _naive_gating(x, k, bias, group_count, k_group, mode, norm_type, scale, eps=1e-20):
    ys, ids = [], []
    for row in x.double().tolist():
        if norm_type == 0:
            e = [math.exp(v - max(row)) for v in row]
            norm = [v / sum(e) for v in e]
        else:
            norm = [1 / (1 + math.exp(-v)) for v in row]
        choice = [v + (bias[i].item() if bias is not None else 0) for i, v in enumerate(norm)]
        size = len(row) // group_count
        groups = [choice[g * size:(g + 1) * size] for g in range(group_count)]
        gscore = [max(g) if mode == 0 else sum(sorted(g)[-2:]) for g in groups]
        keep = sorted(range(group_count), key=lambda g: (-gscore[g], g))[:k_group]
        cand = [i for i in range(len(row)) if i // size in keep]
        top = sorted(cand, key=lambda i: (-choice[i], i))[:k]
        y = [norm[i] for i in top]
        if norm_type == 1:
            y = [v / (sum(y) + eps) for v in y]
        ys.append([v * scale for v in y])
        ids.append(top)
    return torch.tensor(ys), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("group_count,k_group,mode,norm_type", [(1, 1, 0, 1), (4, 2, 0, 1), (4, 2, 1, 0)])
def test_moe_gating_top_k(tnpu, group_count, k_group, mode, norm_type):
    x, bias = torch.randn(6, 32), torch.randn(32) * 0.3
    y, idx, norm = tnpu.npu_moe_gating_top_k(x, 3, bias=bias, k_group=k_group, group_count=group_count,
                                             group_select_mode=mode, norm_type=norm_type, routed_scaling_factor=2.5)
    ny, nidx = _naive_gating(x, 3, bias, group_count, k_group, mode, norm_type, 2.5)
    assert torch.equal(idx, nidx) and idx.dtype == torch.int32
    _close(y, ny)
    _close(norm, x.softmax(-1) if norm_type == 0 else x.sigmoid())


def test_moe_gating_top_k_hash_mode(tnpu):
    x, tid2eid = torch.randn(5, 16), torch.randint(0, 16, (40, 4))
    ids = torch.tensor([3, 0, 39, 3, 7])
    y, idx, _ = tnpu.npu_moe_gating_top_k(x, 4, input_ids=ids, tid2eid=tid2eid, norm_type=1)
    assert torch.equal(idx.long(), tid2eid[ids])
    s = x.sigmoid().gather(1, tid2eid[ids])
    _close(y, s / s.sum(-1, keepdim=True))
    with pytest.raises(RuntimeError, match="both provided"):
        tnpu.npu_moe_gating_top_k(x, 4, input_ids=ids, norm_type=1)


def test_mhc_pre(tnpu):
    T, n, D = 3, 4, 16
    x = torch.randn(T, n, D).bfloat16()
    phi, alpha, bias, gamma = torch.randn(24, n * D), torch.rand(3), torch.randn(24), torch.rand(n, D) + 0.5
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = tnpu.npu_mhc_pre(x, phi, alpha, bias, gamma=gamma, norm_eps=1e-6, hc_eps=1e-3)
    for t in range(T):
        v = x[t].double().flatten()
        r = 1 / math.sqrt(float((v * v).mean()) + 1e-6)
        mix = [(v * gamma.double().flatten() * phi[j].double()).sum().item() for j in range(24)]   # before 1/rms
        a, mix_normed = alpha.tolist(), [m * r for m in mix]
        pre = [1 / (1 + math.exp(-(a[0] * mix_normed[j] + bias[j].item()))) + 1e-3 for j in range(n)]
        post = [2 / (1 + math.exp(-(a[1] * mix_normed[n + j] + bias[n + j].item()))) for j in range(n)]
        res = [a[2] * mix_normed[2 * n + j] + bias[2 * n + j].item() for j in range(n * n)]
        assert inv_rms[t].item() == pytest.approx(r, rel=1e-5)
        _close(h_mix[t], torch.tensor(mix), 1e-4)
        _close(h_pre[t], torch.tensor(pre), 1e-5)
        _close(h_post[t], torch.tensor(post), 1e-5)
        _close(h_res[t].flatten(), torch.tensor(res), 1e-4)
        _close(h_in[t], sum(pre[k] * x[t, k].double() for k in range(n)), 1e-2)
    assert h_in.dtype == torch.bfloat16 and h_post.dtype == torch.float32
    assert tnpu.npu_mhc_pre(x, phi[:8], alpha[:2], bias[:8])[2].shape == (1,)  # no res rows: h_res is a placeholder


def test_mhc_post(tnpu):
    B, S, n, D = 1, 2, 4, 16
    x, h_out = torch.randn(B, S, n, D).half(), torch.randn(B, S, D).half()
    h_res, h_post = torch.rand(B, S, n, n), torch.rand(B, S, n)
    y = tnpu.npu_mhc_post(x, h_res, h_out, h_post)
    for s in range(S):
        for j in range(n):
            want = h_post[0, s, j] * h_out[0, s].float() + sum(h_res[0, s, k, j] * x[0, s, k].float() for k in range(n))
            _close(y[0, s, j], want, 2e-3)
    _close(tnpu.npu_mhc_post(x, None, h_out, h_post), x.float() + h_post[..., None] * h_out.float()[:, :, None], 2e-3)


def test_mhc_sinkhorn(tnpu):
    x = torch.randn(2, 3, 4, 4)
    y, _, _ = tnpu.npu_mhc_sinkhorn(x, eps=1e-6, num_iters=20)
    for b in range(2):
        for s in range(3):
            m = [[math.exp(v) for v in row] for row in x[b, s].double().tolist()]
            m = [[v / sum(row) + 1e-6 for v in row] for row in m]
            for it in range(20):
                if it:
                    m = [[v / (sum(row) + 1e-6) for v in row] for row in m]
                cols = [sum(m[i][j] for i in range(4)) + 1e-6 for j in range(4)]
                m = [[m[i][j] / cols[j] for j in range(4)] for i in range(4)]
            _close(y[b, s], torch.tensor(m), 1e-5)
    _close(y.sum(-2), torch.ones(2, 3, 4), 1e-4)  # columns sum to one after the last step


def _naive_scores(q, k, w, visible):
    """q [S, H, D], k [T, D], w [S, H]; visible(i) -> number of visible keys; per query {key: score}."""
    return [{t: sum(w[i, h].item() * max(0.0, float(q[i, h].double() @ k[t].double())) for h in range(q.shape[1]))
             for t in range(visible(i))} for i in range(q.shape[0])]


def _is_topk(chosen, scores, count):
    """`chosen` holds min(count, len(scores)) distinct keys, none scoring below an unchosen one (ties may go either way)."""
    chosen = [c for c in chosen if c >= 0]
    rest = [v for t, v in scores.items() if t not in chosen]
    return (len(set(chosen)) == len(chosen) == min(count, len(scores)) and set(chosen) <= set(scores)
            and (not rest or min(scores[c] for c in chosen) >= max(rest) - 1e-3))


def test_lightning_indexer_bsnd_causal_and_padding(tnpu):
    bf = torch.bfloat16
    q, k, w = torch.randn(2, 3, 4, 128, dtype=bf), torch.randn(2, 7, 1, 128, dtype=bf), torch.randn(2, 3, 4)
    kv_len = torch.tensor([7, 2], dtype=torch.int32)
    idx, _ = tnpu.npu_lightning_indexer(q, k, w, actual_seq_lengths_key=kv_len, sparse_count=4, sparse_mode=3)
    assert idx.shape == (2, 3, 1, 4) and idx.dtype == torch.int32
    for b in range(2):
        L = int(kv_len[b])
        scores = _naive_scores(q[b], k[b, :, 0], w[b], lambda i: max(0, min(L, L - 3 + i + 1)))
        for i in range(3):
            got = idx[b, i, 0].tolist()
            assert _is_topk(got, scores[i], 4)
            assert all(v == -1 for v in got[len(scores[i]):])  # padding sits at the end


def test_lightning_indexer_tnd_paged_equals_per_query_lengths(tnpu):
    bf = torch.bfloat16
    q, w = torch.randn(5, 2, 128, dtype=bf), torch.randn(5, 2)
    blocks = torch.randn(6, 16, 1, 128, dtype=bf)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    idx, _ = tnpu.npu_lightning_indexer(q, blocks, w, actual_seq_lengths_query=torch.tensor([2, 5], dtype=torch.int32),
                                        actual_seq_lengths_key=torch.tensor([40, 20], dtype=torch.int32), block_table=table,
                                        layout_query="TND", layout_key="PA_BSND", sparse_count=6, sparse_mode=0)
    assert idx.shape == (5, 1, 6)
    for b, (rows, L) in enumerate([(range(0, 2), 40), (range(2, 5), 20)]):
        keys = blocks[table[b].long()].flatten(0, 1)[:L, 0]
        scores = _naive_scores(q[list(rows)], keys, w[list(rows)], lambda i: L)
        for i, r in enumerate(rows):
            assert _is_topk(idx[r, 0].tolist(), scores[i], 6)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quant_lightning_indexer_dequantises_per_token_head(tnpu, dtype):
    q = torch.randint(-20, 20, (1, 3, 4, 128)).to(dtype)
    k = torch.randint(-20, 20, (2, 16, 1, 128)).to(dtype)       # two paged blocks of 16 tokens
    w, sq, sk = torch.rand(1, 3, 4).half(), torch.rand(1, 3, 4).half() + 0.5, torch.rand(2, 16, 1).half() + 0.5
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    idx = tnpu.npu_quant_lightning_indexer(q, k, w, sq, sk, 0, 0, actual_seq_lengths_key=torch.tensor([20], dtype=torch.int32),
                                           block_table=table, layout_key="PA_BSND", sparse_count=5, sparse_mode=3)
    keys, key_scale = k[table[0].long()].flatten(0, 1)[:20, 0], sk[table[0].long()].flatten(0, 1)[:20, 0]
    for i in range(3):
        visible = 20 - 3 + i + 1
        scores = {t: sum(w[0, i, h].item() * max(0.0, sq[0, i, h].item() * key_scale[t].item()
                                                 * float(q[0, i, h].double() @ keys[t].double())) for h in range(4))
                  for t in range(visible)}
        assert _is_topk(idx[0, i, 0].tolist(), scores, 5)
    with pytest.raises(RuntimeError, match="quant mode 0"):
        tnpu.npu_quant_lightning_indexer(q, k[:1], w, sq, sk[:1], 1, 0, sparse_count=5)


def _naive_sfa(q, qr, k, kr, v, idx, scale, sink, block, limit):
    """q [S, H, 512] ...; idx [S, K]; the first -1 ends a row; limit(i) = last visible kv position."""
    S, H = q.shape[:2]
    out = torch.zeros(S, H, 512, dtype=torch.float64)
    for i in range(S):
        toks = []
        for b in idx[i].tolist():
            if b < 0:
                break
            toks += [t for t in range(b * block, (b + 1) * block) if t < k.shape[0] and t <= limit(i)]
        for h in range(H):
            logits = [scale * float(torch.cat([q[i, h], qr[i, h]]).double() @ torch.cat([k[t], kr[t]]).double()) for t in toks]
            terms = [math.exp(z) for z in logits]
            denom = sum(terms) + (math.exp(sink[h].item()) if sink is not None else 0.0)
            if denom:
                out[i, h] = sum(p / denom * v[t].double() for p, t in zip(terms, toks)) if toks else 0
    return out


@pytest.mark.parametrize("block,mode,with_sink", [(1, 0, True), (1, 3, False), (2, 3, True)])
def test_sparse_flash_attention(tnpu, block, mode, with_sink):
    bf = torch.bfloat16
    S, H, T = 3, 2, 9
    q, qr = torch.randn(1, S, H, 512, dtype=bf) * 0.05, torch.randn(1, S, H, 64, dtype=bf)
    k, kr = torch.randn(1, T, 1, 512, dtype=bf), torch.randn(1, T, 1, 64, dtype=bf)
    idx = torch.tensor([[[4, 0, 2, -1]], [[1, -1, 3, 3]], [[-1, 2, 0, 1]]], dtype=torch.int32)[None]
    sink = torch.randn(H) if with_sink else None
    out, _, _ = tnpu.npu_sparse_flash_attention(q, k, k, idx, 0.07, query_rope=qr, key_rope=kr, sparse_block_size=block,
                                                sparse_mode=mode, attention_mode=2, sinks=sink)
    limit = (lambda i: T - 1) if mode == 0 else (lambda i: T - S + i)
    want = _naive_sfa(q[0], qr[0], k[0, :, 0], kr[0, :, 0], k[0, :, 0], idx[0, :, 0], 0.07, sink, block, limit)
    assert out.dtype == bf and out.shape == q.shape
    _close(out[0], want, 2e-2)
    assert out[0, 2].abs().max() == 0  # the row starting with -1 selects nothing


def test_grouped_matmul_groups_rows_by_group_list(tnpu):
    """npu_grouped_matmul, single x / weight / y on the m axis: rows of group e times weight[e], for cumulative and
    per-group counts, a transposed weight view, and int8 weights pseudo-quantised per channel; bad group lists fail
    as the operator does."""
    bf = torch.bfloat16
    x = torch.randn(7, 16, dtype=bf)
    w = torch.randn(3, 8, 16, dtype=bf)                        # [E, N, K]: passed as its [E, K, N] transpose
    groups = [(0, 2), (2, 2), (2, 7)]                          # group 1 empty
    want = torch.zeros(7, 8)
    for e, (a, b) in enumerate(groups):
        want[a:b] = x[a:b].float() @ w[e].float().T
    call = dict(split_item=3, group_type=0)
    for gl, kind in ((torch.tensor([2, 2, 7]), 0), (torch.tensor([2, 0, 5]), 1)):
        y = tnpu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=gl, group_list_type=kind, **call)[0]
        torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    q = torch.randint(-127, 128, (3, 16, 8), dtype=torch.int8)
    scale = (torch.rand(3, 8) / 50).to(bf)
    y = tnpu.npu_grouped_matmul([x], [q], antiquant_scale=[scale], group_list=torch.tensor([2, 2, 7]), **call)[0]
    deq = q.float() * scale.float()[:, None, :]
    want_q = torch.cat([x[a:b].float() @ deq[e] for e, (a, b) in enumerate(groups)])
    torch.testing.assert_close(y.float(), want_q, rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="covers 6 rows, x has 7"):
        tnpu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=torch.tensor([2, 2, 6]), **call)
    with pytest.raises(RuntimeError, match="must not decrease"):
        tnpu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=torch.tensor([3, 2, 7]), **call)
    with pytest.raises(NotImplementedError, match="bias is not emulated"):
        tnpu.npu_grouped_matmul([x], [w.transpose(1, 2)], bias=[torch.zeros(8)], group_list=torch.tensor([2, 2, 7]),
                                **call)


def test_weight_quant_batchmatmul_per_channel(tnpu):
    """npu_weight_quant_batchmatmul: x @ ((w + offset) * scale) with per-channel or per-tensor scales, a transposed
    int8 weight view; per-group scales and output quantisation are not emulated."""
    bf = torch.bfloat16
    x = torch.randn(3, 16, dtype=bf)
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)               # [N, K]: passed transposed
    scale, offset = (torch.rand(8) / 50).to(bf), torch.randint(-3, 4, (8,)).to(bf)
    y = tnpu.npu_weight_quant_batchmatmul(x, w.t(), scale, offset)
    want = x.float() @ ((w.float() + offset.float()[:, None]) * scale.float()[:, None]).t()
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    one = tnpu.npu_weight_quant_batchmatmul(x, w.t(), scale[:1])
    torch.testing.assert_close(one.float(), x.float() @ (w.float() * scale[:1].float()).t(), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="x has K=16, weight has 8 rows"):
        tnpu.npu_weight_quant_batchmatmul(x, w, scale)
    with pytest.raises(NotImplementedError, match="per-group"):
        tnpu.npu_weight_quant_batchmatmul(x, w.t(), scale, antiquant_group_size=32)


def test_lightning_indexer_ties_keep_the_lower_index(tnpu):
    """Every score 0 (keys of zeros): the visible entries tie, and the first `sparse_count` by index are chosen, in
    index order, as ops-transformer's golden reference sorts (stably, descending)."""
    q, k = torch.randn(1, 1, 2, 128, dtype=torch.bfloat16), torch.zeros(1, 9, 1, 128, dtype=torch.bfloat16)
    idx, _ = tnpu.npu_lightning_indexer(q, k, torch.rand(1, 1, 2), actual_seq_lengths_key=torch.tensor([7]),
                                        sparse_count=4, sparse_mode=0)
    assert idx[0, 0, 0].tolist() == [0, 1, 2, 3]

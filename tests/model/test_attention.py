"""Attention layer: against a naive per-token / per-block reference, and its own paths against each other
(decode after prefill vs one full forward, chunked vs single prefill, padded batch vs sequences alone)."""

import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import kernels as K
from model.attention import Attention
from model.cache import KVCache
from model.compressor import Compressor
from model.config import ModelConfig
from model.kernels import pool_blocks, use_kernels
from model.linear import Linear
from model.parallel import ParallelContext
from model.quant import fp4_round_trip, fp8_round_trip
from tests.conftest import free_port, load_official, needs_official, official_args


def tiny(**kw) -> ModelConfig:
    # window 16, ratios 0 / 4 / 128, 4 indexer heads with top-4: small enough for loops, big enough to select
    base = dict(n_layers=3, compress_ratios=(0, 4, 128), max_seq_len=512, dtype="bf16")
    base.update(kw)
    return ModelConfig.preset("tiny", **base)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, Linear):
            m.set_from_float(torch.randn(m.out_features, m.in_features, generator=g) * m.in_features ** -0.5)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("ape"):
            p.data = 0.5 * torch.randn(p.shape, generator=g)
        elif name.endswith("attn_sink"):
            p.data = torch.randn(p.shape, generator=g)
    return module


def layer(cfg: ModelConfig, layer_id: int, seed: int = 1) -> Attention:
    return randomize(Attention(cfg, layer_id), seed)


def run(attn, x, cache, start, n_valid=None):
    out = attn(x, torch.as_tensor(start), cache, None if n_valid is None else torch.as_tensor(n_valid))
    return out


# --------------------------------------------------------------------------------------- naive reference
def _rot(v, angle, inverse=False):
    """Interleaved rotation of the last 2 * len(angle) dims of v by complex multiplication."""
    r = 2 * angle.numel()
    z = torch.view_as_complex(v[..., -r:].double().reshape(*v.shape[:-1], -1, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angle.double()), -angle.double() if inverse else angle.double())
    return torch.cat((v[..., :-r].double(), torch.view_as_real(z).flatten(-2)), -1)


def _rms(v, w=None, eps=1e-6):
    v = v.double() / torch.sqrt(v.double().pow(2).mean(-1, keepdim=True) + eps)
    return v if w is None else v * w.double()


def _hadamard(v):
    n = v.size(-1)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return v.double() @ h / math.sqrt(n)


def naive_entries(comp: Compressor, x, freqs, sim):
    """Entries of every complete block, one block at a time (float64)."""
    r, d = comp.ratio, comp.head_dim
    kv = x.double() @ comp.wkv.dequantized(torch.float64).T
    score = x.double() @ comp.wgate.dequantized(torch.float64).T
    out = []
    for j in range(x.size(0) // r):
        cur = slice(j * r, (j + 1) * r)
        if comp.overlap:
            prev_kv = kv[cur][:, :d] * 0 if j == 0 else kv[(j - 1) * r:j * r, :d]
            prev_sc = torch.full((r, d), -math.inf, dtype=torch.float64) if j == 0 else \
                score[(j - 1) * r:j * r, :d] + comp.ape[:, :d].double()
            slots_kv = torch.cat([prev_kv, kv[cur, d:]])
            slots_sc = torch.cat([prev_sc, score[cur, d:] + comp.ape[:, d:].double()])
        else:
            slots_kv, slots_sc = kv[cur], score[cur] + comp.ape.double()
        e = (slots_kv * torch.softmax(slots_sc, 0)).sum(0)
        e = _rot(_rms(e, comp.norm.weight), freqs * (j * r))
        if comp.rotate:
            e = _hadamard(e)
            e = fp4_round_trip(e.float()).double() if sim else e
        elif sim:
            e = torch.cat([fp8_round_trip(e[:-64].float(), 64).double(), e[-64:]])
        out.append(e)
    return torch.stack(out) if out else torch.zeros(0, d, dtype=torch.float64)


def naive_attention(attn: Attention, x, sim=False):
    """One sequence x [L, dim] attended from scratch with explicit loops (float64)."""
    L = x.size(0)
    f = attn.rotary.freqs
    xd = x.double()
    qr = _rms(xd @ attn.wq_a.dequantized(torch.float64).T, attn.q_norm.weight)
    q = (qr @ attn.wq_b.dequantized(torch.float64).T).view(L, -1, attn.head_dim)
    kv = _rms(xd @ attn.wkv.dequantized(torch.float64).T, attn.kv_norm.weight)
    kv = torch.stack([_rot(kv[i], f * i) for i in range(L)])
    if sim:
        kv = torch.cat([fp8_round_trip(kv[:, :-64].float(), 64).double(), kv[:, -64:]], -1)
    entries = naive_entries(attn.compressor, x, f, sim) if attn.ratio else None
    if attn.indexer is not None:
        ix = attn.indexer
        keys = naive_entries(ix.compressor, x, f, sim)
        iq = (qr @ ix.wq_b.dequantized(torch.float64).T).view(L, -1, ix.head_dim)
        w = xd @ ix.weights_proj.dequantized(torch.float64).T * ix.weight_scale
    outs = []
    for i in range(L):
        qi = _rms(q[i])
        qi = torch.stack([_rot(h, f * i) for h in qi])
        rows = [kv[t] for t in range(max(0, i - attn.window + 1), i + 1)]
        n_vis = (i + 1) // attn.ratio if attn.ratio else 0
        if attn.ratio == 128:
            rows += [entries[t] for t in range(n_vis)]
        elif attn.ratio == 4:
            qq = _hadamard(torch.stack([_rot(h, f * i) for h in iq[i]]))
            if sim:
                qq = fp4_round_trip(qq.float()).double()
            score = [(w[i] * torch.relu(qq @ keys[t])).sum().item() for t in range(n_vis)]
            chosen = sorted(range(n_vis), key=lambda t: -score[t])[:ix.topk]
            rows += [entries[t] for t in chosen]
        keys_i = torch.stack(rows)
        logits = qi @ keys_i.T * attn.softmax_scale
        e = torch.exp(logits)
        p = e / (e.sum(-1, keepdim=True) + torch.exp(attn.attn_sink.double())[:, None])
        o = p @ keys_i
        o = torch.stack([_rot(h, f * i, inverse=True) for h in o])
        o = o.reshape(attn.n_local_groups, -1)
        groups = attn.n_local_groups
        wo_a = attn.wo_a.dequantized(torch.float64).view(groups, attn.wo_a.out_features // groups, -1)
        o = torch.einsum("gd,grd->gr", o, wo_a).flatten()
        outs.append(o @ attn.wo_b.dequantized(torch.float64).T)
    return torch.stack(outs)


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layer_id", [0, 1, 2])
def test_full_forward_matches_naive(layer_id):
    cfg = tiny(quant_sim=False)
    attn = layer(cfg, layer_id)
    L = 300 if layer_id == 2 else 70
    x = torch.randn(1, L, cfg.dim)
    cache = KVCache(cfg, 1, 512, torch.float32)
    got = run(attn, x, cache.layers[layer_id], [0])
    want = naive_attention(attn, x[0])
    torch.testing.assert_close(got[0].double(), want, atol=1e-4, rtol=1e-4)


def test_quant_sim_matches_naive_and_changes_output():
    cfg = tiny()
    attn = layer(cfg, 1)
    x = torch.randn(1, 48, cfg.dim)
    got = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[1], [0])
    torch.testing.assert_close(got[0].double(), naive_attention(attn, x[0], sim=True), atol=2e-3, rtol=2e-3)
    attn.set_quant_sim(False)
    off = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[1], [0])
    assert (off - got).abs().max() > 1e-3


@pytest.mark.parametrize("quant_sim", [False, True])
def test_decode_after_prefill_equals_full_forward(quant_sim):
    # real ratios 4 and 128, 330 tokens: crosses 82 CSA blocks and 2 HCA blocks, 20 windows of 16
    cfg = tiny(quant_sim=quant_sim)
    L, P = 330, 250
    x = torch.randn(1, L, cfg.dim)
    for layer_id in (1, 2):
        attn = layer(cfg, layer_id)
        full = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[layer_id], [0])
        cache = KVCache(cfg, 1, 512, torch.float32).layers[layer_id]
        parts = [run(attn, x[:, :P], cache, [0])]
        parts += [run(attn, x[:, t:t + 1], cache, [t]) for t in range(P, L)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_single_prefill():
    cfg = tiny()
    x = torch.randn(1, 300, cfg.dim)
    cuts = [0, 3, 40, 41, 130, 131, 256, 300]      # chunks of 3, 37, 1, 89, 1, 125, 44
    for layer_id in (0, 1, 2):
        attn = layer(cfg, layer_id)
        full = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[layer_id], [0])
        cache = KVCache(cfg, 1, 512, torch.float32).layers[layer_id]
        parts = [run(attn, x[:, a:b], cache, [a]) for a, b in zip(cuts, cuts[1:])]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_padded_batch_equals_sequences_alone():
    cfg = tiny()
    lengths = [23, 140, 61]
    S, steps = max(lengths), 9
    xs = [torch.randn(1, n + steps, cfg.dim) for n in lengths]
    for layer_id in (1, 2):
        attn = layer(cfg, layer_id)
        alone = []
        for x, n in zip(xs, lengths):
            c = KVCache(cfg, 1, 512, torch.float32).layers[layer_id]
            alone.append([run(attn, x[:, :n], c, [0])] + [run(attn, x[:, n + k:n + k + 1], c, [n + k])
                                                          for k in range(steps)])
        batch = torch.zeros(3, S, cfg.dim)
        for b, (x, n) in enumerate(zip(xs, lengths)):
            batch[b, :n] = x[0, :n]
        cache = KVCache(cfg, 3, 512, torch.float32)
        out = run(attn, batch, cache.layers[layer_id], [0, 0, 0], lengths)
        cache.advance(torch.tensor(lengths))
        for b, n in enumerate(lengths):
            torch.testing.assert_close(out[b:b + 1, :n], alone[b][0], atol=1e-4, rtol=1e-4)
        for k in range(steps):
            # the middle sequence sits this step out (n_valid 0): it must not disturb its own later steps
            active = torch.tensor([1, 0 if k == 4 else 1, 1])
            tok = torch.stack([xs[b][0, int(cache.lengths[b])] for b in range(3)])[:, None]
            out = run(attn, tok, cache.layers[layer_id], cache.lengths.clone(), active)
            for b in range(3):
                if active[b]:
                    j = int(cache.lengths[b]) - lengths[b]
                    torch.testing.assert_close(out[b:b + 1], alone[b][1 + j], atol=1e-4, rtol=1e-4)
            cache.advance(active)


def _csa_after_prompt(L: int):
    """A tiny CSA layer (top-3 indexer) and its cache after an L-token prompt's prolog and compression: (cfg, layer,
    x, cache, positions, qr, cos, sin)."""
    cfg = tiny(index_topk=3)
    attn = layer(cfg, 1)
    x = torch.randn(1, L, cfg.dim)
    cache = KVCache(cfg, 1, 512, torch.float32).layers[1]
    pos = torch.arange(L)[None]
    _, qr, _, cos, sin = attn.prolog(x, pos)
    attn.compress(x, torch.tensor([0]), torch.tensor([L]), cache)
    return cfg, attn, x, cache, pos, qr, cos, sin


def test_indexer_visibility_and_causality():
    L = 40
    cfg, attn, x, cache, pos, qr, cos, sin = _csa_after_prompt(L)
    rows = attn.select(x, qr, pos, cos, sin, cache)[0]
    assert rows.shape == (L, 3)
    for i in range(L):
        chosen = [int(r) - cfg.window_size for r in rows[i] if r >= 0]
        assert len(chosen) == min(3, (i + 1) // 4) and len(set(chosen)) == len(chosen)
        assert all(0 <= t < (i + 1) // 4 for t in chosen)
    # causality: changing the future leaves the past unchanged
    y1 = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[1], [0])
    x2 = x.clone()
    x2[:, 25:] = torch.randn(1, L - 25, cfg.dim)
    y2 = run(attn, x2, KVCache(cfg, 1, 512, torch.float32).layers[1], [0])
    torch.testing.assert_close(y1[:, :25], y2[:, :25], atol=1e-5, rtol=1e-5)
    assert (y1[:, 25:] - y2[:, 25:]).abs().max() > 1e-3


def test_indexer_scores_then_select_is_its_forward():
    """The two halves a decode schedule may run apart (`Indexer.scores`, `Indexer.select`, where the kernels table
    names its scores kernel) give forward's selection; a table without a scores kernel does not split."""
    L = 40
    _, attn, x, cache, pos, qr, cos, sin = _csa_after_prompt(L)
    assert not attn.indexer.splits
    q, w = attn.indexer.queries(qr, cos, sin), attn.indexer.weights(x)
    use_kernels(attn, dataclasses.replace(K.REFERENCE, indexer_scores=K.indexer_scores))
    assert attn.indexer.splits
    scores = attn.indexer.scores(q, w, pos, cache.index_keys())
    assert scores.shape == (1, L, cache.index_keys().size(1)) and scores.dtype == torch.float32
    assert torch.equal(attn.indexer.select(scores), attn.indexer(q, w, pos, cache.index_keys()))


def test_compressor_streaming_matches_naive_blocks():
    cfg = tiny(quant_sim=False)
    for layer_id, ratio in ((1, 4), (2, 128)):
        attn = layer(cfg, layer_id)
        comp, L = attn.compressor, 2 * ratio + 3
        x = torch.randn(1, L, cfg.dim)
        want = naive_entries(comp, x[0], attn.rotary.freqs, sim=False)
        cache = KVCache(cfg, 1, 512, torch.float32).layers[layer_id]
        got = {}
        for t in range(L):                                # one token at a time
            ids, complete, entries = comp(x[:, t:t + 1], torch.tensor([t]), torch.tensor([1]),
                                          cache.compressor, attn.rotary)
            for k in range(ids.size(1)):
                if complete[0, k]:
                    assert int(ids[0, k]) not in got
                    got[int(ids[0, k])] = entries[0, k]
        assert sorted(got) == list(range(L // ratio))
        torch.testing.assert_close(torch.stack([got[j] for j in sorted(got)]).double(), want, atol=1e-5, rtol=1e-5)


def test_pool_blocks_overlap_layout():
    kv, score = torch.randn(1, 3, 4, 6), torch.randn(1, 3, 4, 6)
    out = pool_blocks(kv, score, overlap=True)
    assert out.shape == (1, 2, 3)
    slots_kv = torch.cat([kv[0, 0, :, :3], kv[0, 1, :, 3:]])
    slots_sc = torch.cat([score[0, 0, :, :3], score[0, 1, :, 3:]])
    torch.testing.assert_close(out[0, 0], (slots_kv * slots_sc.softmax(0)).sum(0))


def test_sink_takes_probability_mass():
    cfg = tiny(quant_sim=False)
    attn = layer(cfg, 0)
    x = torch.randn(1, 20, cfg.dim)
    ref = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[0], [0])
    attn.attn_sink.data.fill_(-1e4)           # no sink: plain softmax
    no_sink = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[0], [0])
    attn.attn_sink.data.fill_(30.0)           # sink dominates: attention output ~ 0
    heavy = run(attn, x, KVCache(cfg, 1, 512, torch.float32).layers[0], [0])
    assert (ref - no_sink).abs().max() > 1e-3
    assert heavy.abs().max() < 1e-6 * no_sink.abs().max()
    # first token with no sink attends only to itself: output = projection of its own (de-rotated) kv
    _, _, kv, cos, sin = attn.prolog(x[:, :1], torch.zeros(1, 1, dtype=torch.long))
    expect = attn.epilog(kv[:, :, None].expand(-1, -1, attn.n_local_heads, -1), cos, sin)
    torch.testing.assert_close(no_sink[:, :1], expect, atol=1e-5, rtol=1e-5)


def test_fp8_cache_layout_matches_bf16_layout():
    cfg = tiny()
    x = torch.randn(1, 140, cfg.dim)
    for layer_id in (1, 2):
        attn = layer(cfg, layer_id)
        outs = []
        for layout in ("bf16", "fp8"):
            cache = KVCache(cfg, 1, 512, torch.float32, layout=layout).layers[layer_id]
            outs.append(torch.cat([run(attn, x[:, :130], cache, [0])] +
                                  [run(attn, x[:, t:t + 1], cache, [t]) for t in range(130, 140)], 1))
        # lossless on the FP8-simulated dims; the RoPE dims are stored in BF16 by the fp8 layout
        torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------- tensor parallel
SPLIT_DIM0 = ("attn_sink", "wq_b.weight", "weights_proj.weight", "wo_a.weight")   # heads / groups per rank


def _shard(state: dict, rank: int, world: int) -> dict:
    out = {}
    for name, t in state.items():
        if name.endswith(SPLIT_DIM0) and "compressor" not in name:
            t = t.chunk(world, 0)[rank]
        elif name.endswith("wo_b.weight"):
            t = t.chunk(world, 1)[rank]
        out[name] = t
    return out


def _tp_worker(rank: int, world: int, port: int, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ctx = ParallelContext(tp_rank=rank, tp_size=world, tp_group=dist.group.WORLD)
    cfg = tiny()
    x = torch.randn(1, 44, cfg.dim, generator=torch.Generator().manual_seed(5))
    diffs = {}
    for layer_id in (1,):                                     # CSA: split heads, groups, sink and indexer heads
        outs, layers = [], []
        for parallel in (None, ctx):
            attn = layer(cfg, layer_id)                       # same seed: same full weights on every rank
            if parallel is not None:
                sharded = Attention(cfg, layer_id, parallel)
                sharded.load_state_dict(_shard(attn.state_dict(), rank, world))
                attn = sharded
            cache = KVCache(cfg, 1, 512, torch.float32).layers[layer_id]
            outs.append(torch.cat([run(attn, x[:, :40], cache, [0])] +
                                  [run(attn, x[:, t:t + 1], cache, [t]) for t in range(40, 44)], 1))
            layers.append((attn, cache))
        diffs[layer_id] = float((outs[0] - outs[1]).abs().max())
        # the selection's two halves (a table that splits it): the rank's scores summed over the group are the
        # single rank's, and their selection is forward's
        scores = []
        for attn, cache in layers:
            use_kernels(attn, dataclasses.replace(K.REFERENCE, indexer_scores=K.indexer_scores))
            pos, x1 = torch.tensor([[43]]), x[:, 43:44]
            _, qr, _, cos, sin = attn.prolog(x1, pos)
            q, w, keys = attn.indexer.queries(qr, cos, sin), attn.indexer.weights(x1), cache.index_keys()
            scores.append(attn.indexer.scores(q, w, pos, keys))
            picks = attn.indexer.select(scores[-1])
            diffs[f"{layer_id} select"] = float((picks != attn.indexer(q, w, pos, keys)).sum())
        diffs[f"{layer_id} scores"] = float((scores[0] - scores[1]).nan_to_num(posinf=1, neginf=1).abs().max())
    out_q.put((rank, diffs))
    dist.destroy_process_group()


def test_tensor_parallel_equals_single_rank():
    ctx = mp.get_context("spawn")
    out_q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, out_q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out_q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in range(2):
        assert max(results[rank].values()) < 1e-4, results


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_decode_step_traces_as_one_static_graph():
    # fullgraph=True fails on any graph break (data-dependent shape, .item(), Python branch on a tensor)
    cfg = tiny()
    attn = layer(cfg, 1)
    x = torch.randn(2, 31, cfg.dim)
    eager, traced = (KVCache(cfg, 2, 512, torch.float32).layers[1] for _ in range(2))
    for cache in (eager, traced):
        run(attn, x[:, :30], cache, [0, 0], [30, 27])
    step = torch.compile(attn.forward, fullgraph=True, backend="eager", dynamic=False)
    start, n_valid = torch.tensor([30, 27]), torch.tensor([1, 1])
    torch.testing.assert_close(step(x[:, 30:], start, traced, n_valid), attn(x[:, 30:], start, eager, n_valid))
    assert torch.equal(traced.kv, eager.kv) and torch.equal(traced.compressor.score, eager.compressor.score)


def test_parameter_names_are_checkpoint_names():
    cfg = tiny()
    linears = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")
    window = {"attn_sink", "q_norm.weight", "kv_norm.weight"} | {f"{n}.weight" for n in linears}
    comp = {"ape", "wkv.weight", "wgate.weight", "norm.weight"}
    hca = window | {f"compressor.{n}" for n in comp}
    csa = hca | {"indexer.wq_b.weight", "indexer.weights_proj.weight"} | {f"indexer.compressor.{n}" for n in comp}
    for layer_id, want in ((0, window), (1, csa), (2, hca)):
        assert set(Attention(cfg, layer_id).state_dict()) == want
    fp8 = Attention(tiny(dtype="fp8"), 1).state_dict()      # quantised projections keep their scales
    assert fp8["wq_b.weight"].dtype == torch.float8_e4m3fn and fp8["wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert fp8["indexer.weights_proj.weight"].dtype == torch.bfloat16 and fp8["attn_sink"].dtype == torch.float32
    # and an FP8-weight layer runs like its dequantised twin
    cfg8 = tiny(dtype="fp8", quant_sim=False)
    attn8, attn = layer(cfg8, 1), Attention(tiny(quant_sim=False), 1)
    attn.load_state_dict({k: v for k, v in attn8.state_dict().items() if not k.endswith(".scale")}, strict=False)
    for name, m in attn8.named_modules():
        if isinstance(m, Linear):
            attn.get_submodule(name).set_from_float(m.dequantized(torch.float32))
    x = torch.randn(1, 20, cfg8.dim)
    torch.testing.assert_close(run(attn8, x, KVCache(cfg8, 1, 64, torch.float32).layers[1], [0]),
                               run(attn, x, KVCache(cfg8, 1, 64, torch.float32).layers[1], [0]))


# --------------------------------------------------------------------------------------- official code parity
@needs_official
@pytest.mark.parametrize("quant_sim", [False, True])
def test_matches_official_inference_code(monkeypatch, quant_sim):
    """Our layers vs the official `inference/model.py` Attention (run from its own folder, pure-torch kernel.py),
    prefill then decode, same weights, float32. The official file's pure-torch act_quant / fp4_act_quant skip the
    cast to FP8 / FP4 that its tilelang kernels do, so they are replaced by the true round trips."""
    import sys
    off = load_official(monkeypatch)
    off.default_dtype = torch.float32
    off.rotate_activation = lambda v: sys.modules["kernel"].hadamard_transform(v, scale=v.size(-1) ** -0.5)
    off.act_quant = lambda v, block=128, *a, **k: v.copy_(fp8_round_trip(v, block)) if quant_sim else v
    off.fp4_act_quant = lambda v, block=32, *a, **k: v.copy_(fp4_round_trip(v, block)) if quant_sim else v
    # 32 indexer heads: with 4, many index scores are exactly 0 and top-k tie-breaking differs between the codes
    cfg = tiny(index_n_heads=32, quant_sim=quant_sim)
    args = official_args(off, cfg, max_batch_size=1, max_seq_len=512, dtype="bf16")
    L, P = 140, 124                       # the first HCA block completes during decode
    x = torch.randn(1, L, cfg.dim)
    for layer_id in (0, 1, 2):
        ours = layer(cfg, layer_id)
        theirs = off.Attention(layer_id, args).float()
        theirs.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
        with torch.no_grad():
            want = torch.cat([theirs(x[:, :P].clone(), 0)] + [theirs(x[:, t:t + 1].clone(), t) for t in range(P, L)], 1)
        cache = KVCache(cfg, 1, 512, torch.float32).layers[layer_id]
        got = torch.cat([run(ours, x[:, :P], cache, [0])] + [run(ours, x[:, t:t + 1], cache, [t]) for t in range(P, L)], 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

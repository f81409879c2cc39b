"""MoE: routing rules, SwiGLU clamps, the layer against a per-token loop, expert parallelism with replicas, and the
static-shape path (gathered stored-format weights) against the dynamic one."""

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import pytest

import model.moe as moe_module
from model.config import ModelConfig
from model.kernels import REFERENCE
from model.moe import Expert, Gate, MoE, MoEError, set_moe_mode
from model.parallel import ParallelContext
from tests.conftest import free_port

CFG = ModelConfig.preset("tiny", expert_dtype="fp4", dtype="fp8")


def _randomise(moe: MoE, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in moe.named_modules():
            if hasattr(mod, "set_from_float"):
                mod.set_from_float(torch.randn(mod.out_features, mod.in_features, generator=g) / 8)
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) / 8)
        if moe.gate.bias is not None:
            moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=g) / 10)
        else:
            k = CFG.n_activated_experts
            moe.gate.tid2eid.copy_(torch.stack([torch.randperm(CFG.n_routed_experts, generator=g)[:k]
                                                for _ in range(CFG.vocab_size)]))


def test_hash_gate_routes_by_token_id():
    gate = Gate(0, CFG)
    assert gate.bias is None and gate.tid2eid.shape == (CFG.vocab_size, CFG.n_activated_experts)
    gate.weight.data.normal_()
    gate.tid2eid.copy_(torch.randint(0, CFG.n_routed_experts, gate.tid2eid.shape))
    x, ids = torch.randn(10, CFG.dim), torch.randint(0, CFG.vocab_size, (10,))
    w, idx = gate(x, ids)
    assert torch.equal(idx, gate.tid2eid[ids])
    scores = F.softplus(x.float() @ gate.weight.float().T).sqrt().gather(1, idx)
    torch.testing.assert_close(w, scores / scores.sum(1, keepdim=True) * CFG.route_scale)
    torch.testing.assert_close(w.sum(1), torch.full((10,), CFG.route_scale))


def test_gate_bias_changes_selection_not_weights():
    gate = Gate(1, CFG)
    assert gate.tid2eid is None and gate.bias.dtype == torch.float32
    gate.weight.data.normal_()
    x, ids = torch.randn(32, CFG.dim), torch.zeros(32, dtype=torch.long)
    w0, i0 = gate(x, ids)
    scores = F.softplus(x.float() @ gate.weight.float().T).sqrt()
    assert torch.equal(i0.sort(1).values, scores.topk(CFG.n_activated_experts, 1).indices.sort(1).values)
    gate.bias.fill_(0)
    gate.bias[[5, 6, 7]] = 100.0                        # forces experts 5, 6, 7 into every choice
    w1, i1 = gate(x, ids)
    assert torch.equal(i1.sort(1).values, torch.tensor([5, 6, 7]).expand(32, 3))
    chosen = scores.gather(1, i1)
    torch.testing.assert_close(w1, chosen / chosen.sum(1, keepdim=True) * CFG.route_scale)  # unbiased scores


def test_expert_clamps_and_weight_before_w2():
    e = Expert(128, 128, "fp32", swiglu_limit=1.0)
    for lin in (e.w1, e.w2, e.w3):
        lin.set_from_float(torch.randn(128, 128))
    x, rw = torch.randn(4, 128) * 3, torch.rand(4, 1)
    gate, up = x @ e.w1.weight.T, x @ e.w3.weight.T
    assert gate.max() > 1 and up.abs().max() > 1      # the clamps are exercised
    want = (F.silu(gate.clamp(max=1.0)) * up.clamp(-1, 1) * rw) @ e.w2.weight.T
    torch.testing.assert_close(e(x, rw), want, rtol=1e-5, atol=1e-5)
    e.swiglu_limit = 0
    torch.testing.assert_close(e(x), (F.silu(gate) * up) @ e.w2.weight.T, rtol=1e-5, atol=1e-5)


def _reference_moe(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token by token: sum_k w_k expert_k(x) + shared(x)."""
    out = []
    for t in range(x.size(0)):
        w, idx = moe.gate(x[t:t + 1], ids[t:t + 1])
        y = moe.shared_experts(x[t:t + 1]).float()
        for k in range(idx.size(1)):
            y = y + moe.experts[str(idx[0, k].item())](x[t:t + 1], w[:, k:k + 1]).float()
        out.append(y)
    return torch.cat(out).to(x.dtype)


def test_moe_equals_per_token_loop():
    for layer in (0, 2):                               # a hash layer and a score-routed layer
        moe = MoE(layer, CFG)
        _randomise(moe, layer)
        x, ids = torch.randn(2, 5, CFG.dim), torch.randint(0, CFG.vocab_size, (2, 5))
        got = moe(x, ids)
        assert got.shape == x.shape
        torch.testing.assert_close(got.view(10, -1), _reference_moe(moe, x.view(10, -1), ids.view(10)),
                                   rtol=1e-5, atol=1e-5)
    assert [k.split(".")[0:3] for k in moe.state_dict() if k.startswith("experts.7.")][0] == ["experts", "7", "w1"]
    assert moe.experts["0"].w1.weight.dtype == torch.int8 and moe.shared_experts.w1.weight.dtype == torch.float8_e4m3fn


LAYOUT = {2: [0, 1, 2, 3, 0, 4, 5, 6, 7, 3, 1, 0]}    # 12 slots for 8 experts: 0 x3, 1 x2, 3 x2


def _two_ranks(worker, *args) -> dict:
    """worker(rank, 2, port, *args, out_q) in two spawned processes, each putting (rank, *result): {rank: result}."""
    ctx = mp.get_context("spawn")
    out_q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, *args, out_q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: rest for rank, *rest in (out_q.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    return results


def _ep_worker(rank, world, port, state, x, ids, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ctx = ParallelContext(ep_rank=rank, ep_size=world, ep_group=dist.group.WORLD, phy2log=LAYOUT)
    moe = MoE(2, CFG, ctx)
    moe.load_state_dict({k: v for k, v in state.items() if k in moe.state_dict()}, strict=True)
    moe.mode = "dynamic"
    dynamic = moe(x, ids).numpy()                    # numpy: pickled by value
    moe.mode = "static"
    out_q.put((rank, sorted(moe.experts.keys(), key=int), dynamic, moe(x, ids).numpy()))
    dist.destroy_process_group()


def test_expert_parallel_with_replicas_equals_single_rank():
    single = MoE(2, CFG)
    _randomise(single, 3)
    x, ids = torch.randn(3, 7, CFG.dim), torch.randint(0, CFG.vocab_size, (3, 7))
    single.mode = "dynamic"
    want = single(x, ids)
    results = _two_ranks(_ep_worker, single.state_dict(), x, ids)
    assert results[0][0] == ["0", "1", "2", "3", "4"] and results[1][0] == ["0", "1", "3", "5", "6", "7"]
    for r in range(2):
        torch.testing.assert_close(torch.from_numpy(results[r][1]), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(results[r][2]), want, rtol=1e-5, atol=1e-5)  # static path


def _exchange_worker(rank, world, port, state, xs, ids, out_q):
    """dp x ep: each rank its own tokens, sent to the experts over the all-to-all in each of its three forms."""
    from ascend.expert_parallel import ExpertLayout, ExpertParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    exchange = ExpertParallel(ExpertLayout(tuple(LAYOUT[2]), world, CFG.n_routed_experts), rank, dist.group.WORLD,
                              count_on_device=True)
    moe = MoE(2, CFG, ParallelContext(ep_rank=rank, ep_size=world, ep_group=dist.group.WORLD, phy2log=LAYOUT,
                                      moe_exchange={2: exchange}))
    moe.load_state_dict({k: v for k, v in state.items() if k in moe.state_dict()}, strict=True)
    ys = {}
    for mode in ("dynamic", "auto", "static"):   # rows per expert; one run_pairs call; the padded all-to-all
        moe.mode = mode
        ys[mode] = moe(xs[rank], ids[rank]).numpy()
    out_q.put((rank, ys, exchange.traffic.to_dict()["sent"]["padding"]))
    dist.destroy_process_group()


def test_token_exchange_forms_equal_single_rank():
    """Each rank's own tokens through the all-to-all (per-expert calls, one run_pairs call, padded fixed shapes)
    give what one rank holding every expert gives for them."""
    single = MoE(2, CFG)
    _randomise(single, 6)
    single.mode = "dynamic"
    xs, ids = torch.randn(2, 2, 3, CFG.dim), torch.randint(0, CFG.vocab_size, (2, 2, 3))
    results = _two_ranks(_exchange_worker, single.state_dict(), xs, ids)
    for r in range(2):
        want = single(xs[r], ids[r])
        ys, padding = results[r]
        for mode, y in ys.items():
            torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode}: {m}")
        assert padding > 0          # the static run went through the padded form


def test_exchange_seam_matches_all_reduce_path():
    """ascend.expert_parallel's exchange plugged in through ParallelContext.moe_exchange gives the same output."""
    from ascend.expert_parallel import ExpertLayout, ExpertParallel

    layout = [0, 1, 2, 3, 4, 5, 6, 7, 0, 3]
    exchange = ExpertParallel(ExpertLayout(tuple(layout), 1, CFG.n_routed_experts))
    plain = MoE(2, CFG, ParallelContext(phy2log={2: layout}))
    seam = MoE(2, CFG, ParallelContext(phy2log={2: layout}, moe_exchange={2: exchange}))
    _randomise(plain, 4)
    seam.load_state_dict(plain.state_dict())
    x, ids = torch.randn(2, 6, CFG.dim), torch.randint(0, CFG.vocab_size, (2, 6))
    torch.testing.assert_close(seam(x, ids), plain(x, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, inter", [("fp4", 256), ("fp8", 256), ("fp8", 192), ("int8", 256), ("bf16", 256)])
def test_static_path_equals_dynamic_path(fmt, inter, monkeypatch):
    """Gathered, dequantised, batched experts == per-expert dynamic gather, for every stored format, with w1 and w3
    in one joint stack, or apart where FP8 scale blocks would straddle them (192 rows); replicas on one rank
    (expert 0 twice, 3 twice) take their share of the tokens either way; a long input in slices too."""
    cfg = ModelConfig.preset("tiny", expert_dtype=fmt, dtype="bf16", moe_inter_dim=inter)
    moe = MoE(2, cfg, ParallelContext(phy2log={2: [0, 1, 2, 3, 4, 5, 6, 7, 0, 3]}))
    assert ("w13.weight" in moe._stacks) == (inter == 256) and ("w1.weight" in moe._stacks) == (inter != 256)
    _randomise(moe, 5)
    x, ids = torch.randn(3, 5, cfg.dim), torch.randint(0, cfg.vocab_size, (3, 5))
    moe.mode = "dynamic"
    want = moe(x, ids)
    moe.mode = "static"
    torch.testing.assert_close(moe(x, ids), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe_module, "STATIC_SLICE_TOKENS", 4)      # 15 tokens: slices of 4, 4, 4 and 3
    torch.testing.assert_close(moe(x, ids), want, rtol=1e-5, atol=1e-5)
    if fmt == "fp8" and inter == 256:                  # with the FP8 activation rounding of fp8 / fp4 GEMMs
        for m in moe.modules():
            if hasattr(m, "act_quant"):
                m.act_quant = True
        moe.mode = "dynamic"
        want = moe(x, ids)
        moe.mode = "static"
        torch.testing.assert_close(moe(x, ids), want, rtol=1e-5, atol=1e-5)


def test_auto_mode_and_stacked_storage():
    moe = MoE(2, CFG)
    _randomise(moe, 6)
    assert moe.use_static(4 * CFG.n_activated_experts) and not moe.use_static(10_000)
    # a table that groups the experts' format (tiny: fp4) runs them static at any size
    moe.kernels = dataclasses.replace(REFERENCE, grouped_expert_formats=("fp4", "fp8"))
    assert moe.use_static(10_000)
    moe.kernels = dataclasses.replace(REFERENCE, grouped_expert_formats=("fp8",))
    assert not moe.use_static(10_000)
    moe.kernels = REFERENCE
    moe.mode = "dynamic"
    assert not moe.use_static(1)
    with pytest.raises(MoEError, match="auto"):
        set_moe_mode(moe, "fast")
    # experts are views of the stacks: loading a state dict updates the static path's weights too
    w = moe.experts["5"].w2.weight
    assert w.data_ptr() == moe._stacks["w2.weight"][5].data_ptr()
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    state["experts.5.w2.weight"] = torch.randint(-100, 100, w.shape, dtype=torch.int8)
    moe.load_state_dict(state)
    assert torch.equal(moe._stacks["w2.weight"][5], state["experts.5.w2.weight"])
    moved = moe.to(torch.float64)                      # _apply re-stacks (quantised tensors stay as they are)
    assert moved.experts["5"].w2.weight.data_ptr() == moved._stacks["w2.weight"][5].data_ptr()
    # w1 and w3 (same input) are the two row halves of one stack, w1 first, scales alike
    inter = CFG.moe_inter_dim
    for kind in ("weight", "scale"):
        joint = moved._stacks[f"w13.{kind}"]
        assert joint.shape[:2] == (len(moved.experts), 2 * inter)
        assert moved.experts["5"].w1.get_parameter(kind).data_ptr() == joint[5, :inter].data_ptr()
        assert moved.experts["5"].w3.get_parameter(kind).data_ptr() == joint[5, inter:].data_ptr()


def test_static_path_calls_the_kernels_expert_matmul():
    """routed_static goes through the Kernels table the MoE was built with: one expert_matmul for w1 and w3
    together and one for w2, one row per (token, choice) selection, and whatever that kernel returns is what the
    layer computes with; the table's grouping of the ids is computed once and handed to both."""
    calls, groupings = [], []

    def grouping(expert_idx, n_experts, fmt):
        groupings.append((tuple(expert_idx.shape), n_experts, fmt))
        return (expert_idx.argsort(),)

    def recording(x, weight, scale, fmt, expert_idx, groups):
        assert torch.equal(groups[0], expert_idx.argsort())
        calls.append((tuple(x.shape), tuple(weight.shape), fmt, tuple(expert_idx.shape)))
        return REFERENCE.expert_matmul(x, weight, scale, fmt, expert_idx)

    moe = MoE(2, CFG, kernels=dataclasses.replace(REFERENCE, expert_matmul=recording, group_experts=grouping))
    plain = MoE(2, CFG)
    _randomise(moe, 7)
    _randomise(plain, 7)
    moe.mode = plain.mode = "static"
    x, ids = torch.randn(2, 3, CFG.dim), torch.randint(0, CFG.vocab_size, (2, 3))
    torch.testing.assert_close(moe(x, ids), plain(x, ids), rtol=0, atol=0)
    n = 6 * CFG.n_activated_experts
    inter, dim, e = CFG.moe_inter_dim, CFG.dim, CFG.n_routed_experts
    # w1 and w3 read the same rows: one call over their joint stack
    assert calls == [((n, dim), (e, 2 * inter, dim // 2), "fp4", (n,)), ((n, inter), (e, dim, inter // 2), "fp4", (n,))]
    assert groupings == [((n,), e, "fp4")]

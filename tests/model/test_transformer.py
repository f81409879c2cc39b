"""The whole model on CPU (tiny, float32): incremental == full forward, chunking, padding, MTP, weights I/O."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.layout import expected_tensors
from convert.names import to_hf
from model.config import ModelConfig
from model.transformer import Transformer, WeightsError, init_random_
from tests.conftest import free_port, load_official, needs_official, official_args

TINY = ModelConfig.preset("tiny")
# Exactness tests switch the FP8 / FP4 round-trip simulations off: with them on, a value that full and incremental
# forwards compute ~1e-7 apart (different matmul shapes) can round to neighbouring FP8 codes, a legitimate
# difference of one quantum that `test_quantised_model_decode_equals_full_forward` bounds separately.
# bf16 weight storage keeps the long decode loops fast on CPU (dequantising fp8/fp4 per use is slow there);
# the quantised formats run through the same code and are covered by the short tests below.
FAST = ModelConfig.preset("tiny", dtype="bf16", expert_dtype="bf16", quant_sim=False)


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return init_random_(Transformer(cfg, dtype=torch.float32), seed).eval()


@pytest.fixture(scope="module")
def fast_model():
    return _model(FAST)


@pytest.fixture(scope="module")
def quant_model():
    return _model(TINY, 1)


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_tensor_names_and_shapes_match_the_checkpoint_table(quant_model):
    ours = {k: tuple(v.shape) for k, v in quant_model.state_dict().items()}
    table = {name: spec.shape for name, spec in expected_tensors(TINY).items()}
    assert ours == table
    quantised = {k: v.dtype for k, v in quant_model.state_dict().items() if k.endswith(("wq_b.weight", "w1.weight"))}
    assert quantised["layers.0.attn.wq_b.weight"] == torch.float8_e4m3fn
    assert quantised["layers.1.ffn.experts.3.w1.weight"] == torch.int8            # packed e2m1
    assert quantised["mtp.0.ffn.shared_experts.w1.weight"] == torch.float8_e4m3fn


@torch.no_grad()
def test_decode_after_prefill_equals_full_forward_over_csa_and_hca_boundaries(fast_model):
    """320 tokens with the real ratios: decode from 236 crosses the HCA boundary at 256 and 21 CSA boundaries."""
    ids = _ids(1, 320)
    full = fast_model(ids, fast_model.new_cache(1, 384), all_logits=True)
    cache = fast_model.new_cache(1, 384)
    prefill = fast_model(ids[:, :236], cache)
    torch.testing.assert_close(prefill, full[:, 235], rtol=0, atol=1e-4)
    for p in range(236, 320):
        step = fast_model(ids[:, p:p + 1], cache)
        torch.testing.assert_close(step, full[:, p], rtol=0, atol=1e-4, msg=f"position {p}")
    assert cache.lengths.tolist() == [320]


@torch.no_grad()
def test_quantised_model_decode_equals_full_forward(quant_model):
    """fp8 projections and fp4 experts: decode crosses CSA blocks and the window (16); exact without the round-trip
    simulations, within FP8 rounding-boundary flips (one e4m3 quantum of a cached value) with them."""
    exact = Transformer(ModelConfig.preset("tiny", quant_sim=False), dtype=torch.float32).eval()
    exact.load_weights(quant_model.state_dict())
    ids = _ids(2, 44, 1)
    for model, atol in ((exact, 1e-4), (quant_model, 2e-2)):
        full = model(ids, model.new_cache(2, 64), all_logits=True)
        cache = model.new_cache(2, 64)
        model(ids[:, :30], cache)
        for p in range(30, 44):
            torch.testing.assert_close(model(ids[:, p:p + 1], cache), full[:, p], rtol=0, atol=atol)


@torch.no_grad()
def test_dropped_model_is_freed_at_once():
    """No reference cycle through the model's modules (the mHC helpers are handed their block at each call), so a
    dropped model frees its weights when the last reference goes, not at some later garbage collection: a script
    that swaps one model for another on a device would otherwise hold both (bench_multi_gpu's peaks did)."""
    import gc
    import weakref

    model = _model(ModelConfig.preset("tiny", n_layers=2, n_mtp_layers=1))
    cache = model.new_cache(1, 16)
    logits, streams = model(_ids(1, 4), cache, return_streams=True)
    model.forward_mtp(streams, _ids(1, 4, 1), cache, torch.zeros(1, dtype=torch.int64))
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model, cache, logits, streams
        assert ref() is None
    finally:
        gc.enable()


def test_chunked_prefill_equals_single_prefill(fast_model):
    ids = _ids(2, 150, 2)
    full = fast_model(ids, fast_model.new_cache(2, 256), all_logits=True)
    cache, at = fast_model.new_cache(2, 256), 0
    for size in (37, 1, 50, 62):                      # uneven chunks, one of a single token
        part = fast_model(ids[:, at:at + size], cache, all_logits=True)
        torch.testing.assert_close(part, full[:, at:at + size], rtol=0, atol=1e-4)
        at += size
    assert at == 150


@torch.no_grad()
def test_padded_mixed_length_batch_equals_each_alone(fast_model):
    lengths = [41, 23, 6]
    ids = _ids(3, 41, 3)
    batch_cache = fast_model.new_cache(3, 64)
    got = fast_model(ids, batch_cache, n_valid=torch.tensor(lengths))
    nxt = _ids(3, 3, 4)
    steps = [fast_model(nxt[:, i:i + 1], batch_cache) for i in range(3)]
    for b, n in enumerate(lengths):
        cache = fast_model.new_cache(1, 64)
        torch.testing.assert_close(got[b], fast_model(ids[b:b + 1, :n], cache)[0], rtol=0, atol=1e-4)
        for i in range(3):
            torch.testing.assert_close(steps[i][b], fast_model(nxt[b:b + 1, i:i + 1], cache)[0], rtol=0, atol=1e-4)
    assert batch_cache.lengths.tolist() == [44, 26, 9]


@torch.no_grad()
def test_mtp_block_incremental_equals_full(fast_model):
    ids = _ids(1, 40, 5)
    cache = fast_model.new_cache(1, 64)
    _, streams = fast_model(ids[:, :-1], cache, all_logits=True, return_streams=True)
    start = torch.zeros(1, dtype=torch.long)
    full = fast_model.forward_mtp(streams, ids[:, 1:], cache, start, all_logits=True)
    assert full.shape == (1, 39, TINY.vocab_size)
    cache = fast_model.new_cache(1, 64)
    _, streams = fast_model(ids[:, :20], cache, all_logits=True, return_streams=True)
    torch.testing.assert_close(fast_model.forward_mtp(streams, ids[:, 1:21], cache, start), full[:, 19],
                               rtol=0, atol=1e-4)
    for p in range(20, 39):
        _, s = fast_model(ids[:, p:p + 1], cache, return_streams=True)
        got = fast_model.forward_mtp(s, ids[:, p + 1:p + 2], cache, torch.tensor([p]))
        torch.testing.assert_close(got, full[:, p], rtol=0, atol=1e-4)


@torch.no_grad()
def test_safetensors_round_trip_in_official_and_hf_names(quant_model, tmp_path):
    state = {k: v.contiguous() for k, v in quant_model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    ids = _ids(2, 24, 6)
    want = quant_model(ids, quant_model.new_cache(2, 32), all_logits=True)
    for names in ("official", "hf"):
        loaded = load_file(tmp_path / "model.safetensors")
        if names == "hf":
            loaded = {to_hf(k): v for k, v in loaded.items()}
        fresh = Transformer(TINY, dtype=torch.float32).eval()
        fresh.load_weights(loaded)
        assert torch.equal(fresh(ids, fresh.new_cache(2, 32), all_logits=True), want)


def test_load_weights_names_the_bad_tensor(quant_model):
    state = dict(quant_model.state_dict())
    model = Transformer(TINY, dtype=torch.float32)
    with pytest.raises(WeightsError, match="missing tensor layers.2.attn.wkv.scale"):
        model.load_weights({k: v for k, v in state.items() if k != "layers.2.attn.wkv.scale"})
    with pytest.raises(WeightsError, match=r"tensor layers.1.ffn.gate.bias: shape \(4,\), expected \(8,\)"):
        model.load_weights({**state, "layers.1.ffn.gate.bias": torch.zeros(4)})
    with pytest.raises(WeightsError, match="tensor layers.0.attn.wq_a.weight: dtype torch.bfloat16"):
        model.load_weights({**state, "layers.0.attn.wq_a.weight": state["layers.0.attn.wq_a.weight"].bfloat16()})
    with pytest.raises(WeightsError, match="unexpected tensor extra.weight"):
        model.load_state_dict({**state, "extra.weight": torch.zeros(1)})   # torch's entry point, same checks
    partial = model.load_weights({k: v for k, v in state.items() if not k.startswith("mtp.")}, strict=False)
    assert partial.unexpected_keys == [] and all(k.startswith("mtp.0.") for k in partial.missing_keys)


def test_load_weights_refuses_values_no_layer_can_use(quant_model):
    """A NaN ue8m0 scale (byte 0xFF) and a hash-routing expert id outside the experts, each named at load."""
    state = dict(quant_model.state_dict())
    model = Transformer(TINY, dtype=torch.float32)
    scale = next(k for k, v in state.items() if v.dtype == torch.float8_e8m0fnu)
    bad = state[scale].clone()
    bad.view(torch.uint8).view(-1)[-1] = 0xFF
    with pytest.raises(WeightsError, match=f"tensor {scale}: ue8m0 scale byte 0xFF"):
        model.load_weights({**state, scale: bad})
    table = next(k for k in state if k.endswith(".gate.tid2eid"))
    for value in (-1, TINY.n_routed_experts):
        wrong = state[table].clone()
        wrong[5, 0] = value
        with pytest.raises(WeightsError, match=rf"tensor {table}: expert ids .*expected 0\.\.{TINY.n_routed_experts - 1}"):
            model.load_weights({**state, table: wrong})
    model.load_weights(state)                                           # the model's own values load


@torch.no_grad()
def test_quant_simulation_switch(quant_model):
    ids = _ids(1, 24, 7)
    off = Transformer(ModelConfig.preset("tiny", quant_sim=False), dtype=torch.float32).eval()
    off.load_weights(quant_model.state_dict())
    a = quant_model(ids, quant_model.new_cache(1, 32), all_logits=True)
    b = off(ids, off.new_cache(1, 32), all_logits=True)
    assert TINY.quant_sim and not torch.equal(a, b)                # on by default, and it acts
    off.set_quant_sim(True)
    assert torch.equal(off(ids, off.new_cache(1, 32), all_logits=True), a)
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0.2)   # token 0: only the FP8 KV round trip differs


# ----------------------------------------------------------------------------------------------- TP x EP = 2 x 2
def _local_slice(full: torch.Tensor, local_shape: tuple, rank: int) -> torch.Tensor:
    """The rank's contiguous slice along every dim where the local parameter is smaller (vocab, heads, groups,
    wo_b inputs, block scales)."""
    for d, (n_full, n_local) in enumerate(zip(full.shape, local_shape)):
        if n_full != n_local:
            full = full.narrow(d, rank * n_local, n_local)
    return full


def _parallel_worker(rank, world, port, state, ids, out_q):
    import torch.distributed as dist

    from model.parallel import ParallelContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    group = dist.group.WORLD
    ctx = ParallelContext(tp_rank=rank, tp_size=world, tp_group=group, ep_rank=rank, ep_size=world, ep_group=group)
    model = Transformer(ModelConfig.preset("tiny", quant_sim=False), ctx, dtype=torch.float32).eval()
    local = model.state_dict()
    model.load_weights({k: _local_slice(state[k], tuple(v.shape), rank) for k, v in local.items()})
    with torch.no_grad():
        cache = model.new_cache(2, 48)
        out = [model(ids[:, :40], cache)] + [model(ids[:, p:p + 1], cache) for p in range(40, 43)]
    out_q.put((rank, len(model.layers[1].ffn.experts), torch.stack(out).numpy()))
    dist.destroy_process_group()


def test_tensor_and_expert_parallel_equal_single_rank(quant_model):
    import torch.multiprocessing as mp

    exact = Transformer(ModelConfig.preset("tiny", quant_sim=False), dtype=torch.float32).eval()
    exact.load_weights(quant_model.state_dict())
    ids = _ids(2, 43, 8)
    with torch.no_grad():
        cache = exact.new_cache(2, 48)
        want = torch.stack([exact(ids[:, :40], cache)] + [exact(ids[:, p:p + 1], cache) for p in range(40, 43)])
    port = free_port()
    spawn = mp.get_context("spawn")
    out_q = spawn.Queue()
    state = {k: v.contiguous() for k, v in quant_model.state_dict().items()}
    procs = [spawn.Process(target=_parallel_worker, args=(r, 2, port, state, ids, out_q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [out_q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, n_local_experts, got in results:
        assert n_local_experts == TINY.n_routed_experts // 2
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-4, msg=f"rank {rank}")


# ----------------------------------------------------------------------------------------------- official parity
def _official_copy(theirs: torch.nn.Module, ours: Transformer) -> None:
    """Our weights into the official model: quantised tensors byte for byte (FP4 through an int8 view of its
    float4_e2m1fn_x2 parameters), wo_a dequantised (the official model holds it in BF16), floats cast."""
    for p in theirs.parameters():
        if p.dtype == torch.bfloat16:          # wo_a / weights_proj: float32, so the float32 run has one dtype
            p.data = p.data.float()
    state = ours.state_dict()
    with torch.no_grad():
        for name, dst in theirs.state_dict(keep_vars=True).items():
            if name in ("mtp.0.embed.weight", "mtp.0.head.weight"):
                continue                       # the official MTP block registers the shared embed / head again
            if name.endswith("wo_a.weight"):
                dst.copy_(ours.get_submodule(name[:-len(".weight")]).dequantized(torch.float32))
            elif dst.dtype == torch.float4_e2m1fn_x2:
                dst.data.view(torch.int8).copy_(state[name])
            else:
                dst.copy_(state[name])


@needs_official
@pytest.mark.parametrize("quant_sim, weights", [(False, "bf16"), (True, "bf16"), (True, "fp8+fp4")])
def test_matches_official_transformer(monkeypatch, quant_sim, weights):
    """The whole model (mHC, attention, MoE with hash and score routing, hc head, MTP) against the official
    `inference/model.py` Transformer run from its own folder with its pure-torch kernel.py, same weights, float32:
    prefill, then decode across the first HCA block boundary. "fp8+fp4" runs the published formats (FP8
    projections, FP4 experts) through the official fp8_gemm / fp4_gemm, with our `act_quant`. As in
    test_attention.py, the official pure-torch in-place act_quant / fp4_act_quant (which skip the FP8 / FP4 cast
    its tilelang kernels do) are replaced by the true round trips, and 32 indexer heads avoid exact-zero ties."""
    import sys

    from model.quant import fp4_round_trip, fp8_round_trip

    off = load_official(monkeypatch)
    kernel = sys.modules["kernel"]

    def act_quant(v, block=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
        if not inplace:                        # activations of the FP8 / FP4 GEMMs: the official reference
            return kernel.act_quant(v, block, scale_fmt, scale_dtype)
        return v.copy_(fp8_round_trip(v, block)) if quant_sim else v

    off.rotate_activation = lambda v: kernel.hadamard_transform(v, scale=v.size(-1) ** -0.5)
    off.act_quant = act_quant
    off.fp4_act_quant = lambda v, block=32, *a, **k: v.copy_(fp4_round_trip(v, block)) if quant_sim else v
    quantised = weights == "fp8+fp4"
    cfg = ModelConfig.preset("tiny", index_n_heads=32, quant_sim=quant_sim, act_quant=quantised,
                             **({} if quantised else dict(dtype="bf16", expert_dtype="bf16")))
    ours = _model(cfg, 5)
    args = official_args(off, cfg, max_batch_size=1, max_seq_len=256, dtype="fp8" if quantised else "bf16",
                         expert_dtype="fp4" if quantised else None)
    theirs = off.Transformer(args)
    assert set(theirs.state_dict()) - set(ours.state_dict()) == {"mtp.0.embed.weight", "mtp.0.head.weight"}
    _official_copy(theirs, ours)
    streams = {}
    theirs.layers[-1].register_forward_hook(lambda m, i, o: None if "h" in streams else streams.update(h=o))

    # bf16 weights: the first HCA entry (tokens 0..127) completes in decode. fp8+fp4: every projection input is
    # FP8-rounded, so over long runs values the two codes compute 1e-7 apart round to neighbouring FP8 codes and
    # flip expert choices; a short run (window 16 and CSA blocks crossed in decode) is exact.
    L, P = (28, 20) if quantised else (136, 124)
    ids = _ids(1, L, 9)
    with torch.no_grad():
        want = [theirs(ids[:, :P], 0)] + [theirs(ids[:, t:t + 1], t) for t in range(P, L)]
        cache = ours.new_cache(1, 256)
        got = [ours(ids[:, :P], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(P, L)]
        torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=1e-4)
        # MTP block on the official main-model streams of the prefill (both codes feed it the same token ids)
        mtp_want = theirs.mtp[0](streams["h"], 0, ids[:, :P])
        mtp_got = ours.forward_mtp(streams["h"], ids[:, :P], ours.new_cache(1, 256), torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(mtp_got, mtp_want, rtol=0, atol=1e-4)


@torch.no_grad()
def test_synthetic_published_checkpoint_loads(tmp_path):
    """convert.synth's checkpoint in the published layout (config.json + index + shards, official and HF-style
    names) loads strictly into a model built from its own config.json, and both spellings give the same logits."""
    import json

    from convert.synth import write_synthetic

    logits = []
    for hf_names in (False, True):
        out = tmp_path / ("hf" if hf_names else "official")
        write_synthetic(out, TINY, seed=3, hf_names=hf_names)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        state = {}
        for fname in sorted(set(index["weight_map"].values())):
            state.update(load_file(out / fname))
        cfg = ModelConfig.from_hf(out)
        assert cfg == TINY
        model = Transformer(cfg, dtype=torch.float32).eval()
        model.load_weights(state)
        logits.append(model(_ids(1, 20, 10), model.new_cache(1, 32)))
    assert torch.isfinite(logits[0]).all() and torch.equal(logits[0], logits[1])

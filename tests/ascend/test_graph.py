"""DecodeGraphRunner: replayed (padded, bucketed) decode equals the eager step, on CPU and on CUDA."""

import copy

import pytest
import torch

from ascend.device import get_device
from ascend.graph import DecodeGraphRunner, GraphError, batch_rows, bucket_for
from ascend.onnx_export import synthetic_attention
from model.cache import KVCache, LayerCache
from model.config import ModelConfig
from model.kernels import REFERENCE, use_kernels

H, D, T, MAX_BATCH = 4, 32, 16, 8


class ToyDecode:
    """A stateful decode step shaped like V4 attention: write this token's KV row, attend over visible rows."""

    def __init__(self, kernels, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.kernels = kernels
        self.wq = torch.randn(D, H * D, generator=g).to(device)
        self.sink = torch.randn(H, generator=g).to(device)
        self.cache = torch.zeros(MAX_BATCH, T, D, device=device)

    def __call__(self, x, pos):
        B = x.shape[0]
        self.cache[:B].scatter_(1, pos.view(B, 1, 1).expand(B, 1, D), x.unsqueeze(1))
        t = torch.arange(T, device=x.device)
        idx = torch.where(t <= pos.unsqueeze(1), t, -1).int().view(B, 1, T)
        q = (x @ self.wq).view(B, 1, H, D)
        return self.kernels.sparse_attn(q, self.cache[:B], idx, self.sink, D ** -0.5), pos + 1


def _make_inputs(device):
    return lambda b: (torch.zeros(b, D, device=device), torch.zeros(b, dtype=torch.long, device=device))


def _check_replay_equals_eager(device_name, kernels):
    device = get_device(device_name)
    dev = device.torch_device
    graphed, eager = ToyDecode(kernels, dev), ToyDecode(kernels, dev)
    runner = DecodeGraphRunner(graphed, _make_inputs(dev), device, buckets=(1, 2, 4, 8)).capture()
    assert runner.captured == (1, 2, 4, 8)
    for batch in (3, 8, 1):     # padded to 4, exact 8, exact 1
        graphed.cache.zero_()
        eager.cache.zero_()
        pos = torch.zeros(batch, dtype=torch.long, device=dev)
        for _ in range(3):      # three decode steps: state carried in the cache
            x = torch.randn(batch, D, device=dev)
            out, nxt = runner(x, pos)
            ref, ref_nxt = eager(x, pos)
            assert out.shape == ref.shape == (batch, 1, H, D)
            torch.testing.assert_close(out, ref)
            assert torch.equal(nxt, ref_nxt)
            pos = nxt


def test_replay_equals_eager_on_cpu():
    _check_replay_equals_eager("cpu", REFERENCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replay_equals_eager_on_cuda_with_cuda_kernels():
    from ascend.backends.cuda import make_kernels
    _check_replay_equals_eager("cuda", make_kernels())


def test_bucket_for_and_errors():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(GraphError, match="exceeds the largest captured bucket 8"):
        bucket_for(9, (1, 2, 4, 8))
    with pytest.raises(GraphError, match="distinct positive"):
        DecodeGraphRunner(lambda x: x, lambda b: (torch.zeros(b),), get_device("cpu"), buckets=(0, 2))
    with pytest.raises(GraphError, match="batch dim 2"):
        DecodeGraphRunner(lambda x: x, lambda b: (torch.zeros(1),), get_device("cpu"), buckets=(2,)).capture()


def _check_attention_decode(device_name, kernels):
    """Real V4 attention (tiny CSA layer): bucketed graph replay of decode == eager decode on a copy of the cache."""
    device = get_device(device_name)
    dev = device.torch_device
    config = ModelConfig.preset("tiny")
    layer = use_kernels(synthetic_attention(config, 1, dev), kernels)
    batch, cap = 3, 64
    cache = LayerCache(config, 1, 4, cap, torch.float32, device=dev)
    views = {b: batch_rows(cache, b) for b in (1, 2, 4)}
    runner = DecodeGraphRunner(lambda x, start: layer(x, start, views[x.shape[0]]),
                               lambda b: (torch.zeros(b, 1, config.dim, device=dev),
                                          torch.full((b,), cap - 1, dtype=torch.long, device=dev)),
                               device, buckets=(1, 2, 4)).capture()
    cache.reset()               # capture ran the step on padding inputs: start the sequences afresh
    prompt = torch.randn(4, 21, config.dim, device=dev)
    layer(prompt, torch.zeros(4, dtype=torch.long, device=dev), cache)          # eager prefill, all rows
    eager_cache = copy.deepcopy(cache)
    start = torch.tensor([21, 21, 21], device=dev)
    for _ in range(4):          # crosses a compression boundary (position 23)
        x = torch.randn(batch, 1, config.dim, device=dev)
        out = runner(x, start)
        ref = layer(x, start, batch_rows(eager_cache, batch))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        start = start + 1
    torch.testing.assert_close(cache.kv[:batch], eager_cache.kv[:batch])


def test_attention_decode_replay_equals_eager_on_cpu():
    _check_attention_decode("cpu", REFERENCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_decode_replay_equals_eager_on_cuda():
    from ascend.backends.cuda import make_kernels
    _check_attention_decode("cuda", make_kernels())


def test_batch_rows_views_write_through():
    config = ModelConfig.preset("tiny")
    cache = KVCache(config, batch=4, max_len=32, dtype=torch.float32)
    view = batch_rows(cache, 2)
    assert view.lengths.shape == (2,) and all(l.kv.shape[0] == 2 for l in view.layers)
    view.lengths += 3
    view.layers[1].index_kv.fill_(1.0)
    view.layers[1].compressor.score.fill_(0.0)
    assert cache.lengths.tolist() == [3, 3, 0, 0]
    assert cache.layers[1].index_kv[:2].eq(1).all() and cache.layers[1].index_kv[2:].eq(0).all()
    assert cache.layers[1].compressor.score[:2].eq(0).all() and cache.layers[1].compressor.score[2:].isinf().all()


def _decode_model(n_layers: int = 4):
    from model.transformer import Transformer, init_random_
    config = ModelConfig.preset("tiny", n_layers=n_layers)   # fp4 experts, fp8 projections, hash, window, CSA, HCA
    return init_random_(Transformer(config, dtype=torch.float32), seed=3).eval()


def _check_transformer_decode(device_name):
    """A whole decode step (static MoE path) replayed from bucketed graphs == eager decode with the dynamic MoE."""
    from model.generate import decode_step, prefill
    from model.moe import set_moe_mode

    device = get_device(device_name)
    dev = device.torch_device
    tol = 1e-5 if device_name == "cpu" else 1e-4      # GPU GEMM and batched GEMM sum in different orders
    with torch.device(dev):
        model = _decode_model()
    cache = model.new_cache(4, 48, device=dev)
    views = {b: batch_rows(cache, b) for b in (1, 2, 4)}
    runner = DecodeGraphRunner(lambda tok, act: decode_step(model, tok, views[tok.shape[0]], act),
                               lambda b: (torch.zeros(b, dtype=torch.long, device=dev),
                                          torch.zeros(b, dtype=torch.bool, device=dev)),   # padding: inactive
                               device, buckets=(1, 2, 4)).capture()
    cache.reset()
    live = batch_rows(cache, 3)
    prompts = [list(range(5, 35)), list(range(40, 47)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15, 16, 17]]
    tokens = prefill(model, prompts, live).argmax(-1)
    eager = copy.deepcopy(live)
    active = torch.tensor([True, True, False], device=dev)   # a finished sequence rides along frozen
    for _ in range(3):                                       # crosses the CSA compression boundary at 32
        out = runner(tokens, active)
        set_moe_mode(model, "dynamic")
        ref = decode_step(model, tokens, eager, active)
        set_moe_mode(model, "auto")
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        tokens = ref.argmax(-1)
    assert torch.equal(live.lengths, eager.lengths) and live.lengths.tolist() == [33, 10, 16]
    for a, b in zip(live.layers, eager.layers):
        torch.testing.assert_close(a.kv, b.kv, rtol=10 * tol, atol=10 * tol)   # summation order of the MoE paths


def test_transformer_decode_replay_equals_eager_on_cpu():
    _check_transformer_decode("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transformer_decode_replay_equals_eager_on_cuda():
    _check_transformer_decode("cuda")


def test_transformer_decode_step_traces_as_one_graph():
    """torch.compile(fullgraph=True) refuses any graph break (host sync, data-dependent shape): the whole decode
    step traces with the static MoE path and gives the eager result; the dynamic MoE path does not trace."""
    from model.generate import decode_step, prefill
    from model.moe import set_moe_mode

    model = _decode_model(n_layers=3)                       # one layer of each type: tracing time grows with depth
    cache = model.new_cache(2, 40)
    tokens = prefill(model, [list(range(5, 25)), [7, 8, 9]], cache).argmax(-1)
    active = torch.ones(2, dtype=torch.bool)
    eager_cache = copy.deepcopy(cache)
    step = torch.compile(lambda tok, act: decode_step(model, tok, cache, act), backend="eager", fullgraph=True)
    out = step(tokens, active)
    set_moe_mode(model, "dynamic")
    torch.testing.assert_close(out, decode_step(model, tokens, eager_cache, active), rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.lengths, eager_cache.lengths)
    broken = torch.compile(lambda tok, act: decode_step(model, tok, eager_cache, act), backend="eager",
                           fullgraph=True)
    with pytest.raises(Exception, match="(?i)graph break|data.dependent|tolist|item|nonzero"):
        broken(tokens, active)

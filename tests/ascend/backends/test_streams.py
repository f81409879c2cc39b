"""StreamedDecode (one attention layer's decode stages on concurrent streams) against the layer's own forward."""

import copy

import pytest
import torch

from ascend.backends import cuda
from ascend.backends.streams import StreamedDecode
from ascend.device import get_device
from ascend.onnx_export import synthetic_attention
from model.cache import LayerCache
from model.config import ModelConfig
from model.kernels import use_kernels

CONFIG = ModelConfig.preset("tiny", dtype="bf16", max_seq_len=256)
LAYERS = {"window": 0, "csa": 1, "hca": 2}           # tiny's compress ratios 0, 4, 128


def _setup(kind, device="cpu", batch=3, dtype=torch.float32):
    layer_id = LAYERS[kind]
    assert CONFIG.compress_ratio(layer_id) == {"window": 0, "csa": 4, "hca": 128}[kind]
    layer = synthetic_attention(CONFIG, layer_id, device)
    g = torch.Generator(device).manual_seed(1)
    cache = LayerCache(CONFIG, layer_id, batch, 256, dtype, device=device)
    cache.kv.normal_(generator=g)
    if cache.index_kv is not None:
        cache.index_kv.normal_(generator=g)
    x = torch.randn(batch, 1, CONFIG.dim, generator=g, device=device).to(dtype)
    # positions that complete a CSA block (4k + 3), an HCA block (127) and neither
    start = torch.tensor([127, 42, 200], device=device)[:batch]
    return layer, cache, x, start


def _state(cache):
    tensors = [cache.kv, cache.index_kv]
    for s in (cache.compressor, cache.index_compressor):
        tensors += [] if s is None else [s.kv, s.score]
    return [t.clone() for t in tensors if t is not None]


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("compiled", [False, True])
def test_streamed_decode_equals_the_layer(kind, compiled):
    """Four decode steps (positions moving across block ends; the first with an idle row, whose n_valid 0 stores
    nothing, the others with n_valid left out), outputs and every cache tensor as the layer's own forward leaves
    them; compiled: each stage traced by torch.compile (aot_eager: the graphs, not inductor's code)."""
    layer, cache, x, start = _setup(kind)
    mine = copy.deepcopy(cache)
    torch._dynamo.reset()
    try:
        step = StreamedDecode(layer, get_device("cpu"), compile=compiled,
                              **({"backend": "aot_eager"} if compiled else {}))
        with torch.no_grad():
            for i, n_valid in enumerate([torch.tensor([1, 0, 1]), None, None, None]):
                assert torch.equal(step(x, start + i, mine, n_valid), layer(x, start + i, cache, n_valid))
                for a, b in zip(_state(mine), _state(cache)):
                    assert torch.equal(a, b)
    finally:
        torch._dynamo.reset()


def test_streamed_decode_refuses_prefill_chunks():
    layer, cache, x, start = _setup("csa")
    with pytest.raises(ValueError, match="decode steps"):
        StreamedDecode(layer, get_device("cpu"), compile=False)(x.expand(-1, 2, -1), start, cache)


def test_streamed_decode_uses_one_side_stream_per_branch():
    """window: the kv path only; HCA: + its compressor; CSA: + the indexer's compressor and its queries."""
    dev = get_device("cpu")
    counts = {kind: len(StreamedDecode(_setup(kind)[0], dev, compile=False).sides) for kind in LAYERS}
    assert counts == {"window": 1, "csa": 4, "hca": 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_streamed_decode_captured_on_cuda_equals_the_layer(kind):
    """The branches really on separate streams, captured as one CUDA graph and replayed: the same kernels as the
    layer's eager forward (the CUDA table), so the same bits, step after step (a missing join or a block reused
    across streams would show as a difference)."""
    dev = get_device("cuda")
    layer, cache, x, start = _setup(kind, "cuda", dtype=torch.bfloat16)
    use_kernels(layer, cuda.make_kernels())
    mine = copy.deepcopy(cache)
    step = StreamedDecode(layer, dev, compile=False)
    with torch.no_grad():
        step(x, start, copy.deepcopy(cache))           # kernels built (and tuned) outside the capture
        graph = dev.graph()
        pos = start.clone()
        out = graph.capture(lambda: step(x, pos, mine), warmup=0)
        for i in range(3):
            pos.copy_(start + i)
            graph.replay()
            assert torch.equal(out, layer(x, start + i, cache))
            for a, b in zip(_state(mine), _state(cache)):
                assert torch.equal(a, b)

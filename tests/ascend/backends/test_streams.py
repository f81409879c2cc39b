"""StreamedDecode (one attention layer's decode stages on concurrent streams) against the layer's own forward."""

import contextlib
import copy
import dataclasses

import pytest
import torch

from ascend.backends import cuda
from ascend.backends.streams import StreamedDecode
from ascend.device import get_device
from ascend.onnx_export import synthetic_attention
from model.cache import LayerCache
from model.config import ModelConfig
from model import kernels as K
from model.kernels import use_kernels

CONFIG = ModelConfig.preset("tiny", dtype="bf16", max_seq_len=256)
LAYERS = {"window": 0, "csa": 1, "hca": 2}           # tiny's compress ratios 0, 4, 128
# the CSA selection as one operator (the reference table, as the NPU's), or as scores then a top-k (the CUDA tables;
# here with the reference's own two halves, so the layer's forward gives the same bits)
TABLES = {"fused": K.REFERENCE, "split": dataclasses.replace(K.REFERENCE, indexer_scores=K.indexer_scores)}


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
@pytest.mark.parametrize("table", list(TABLES))
def test_streamed_decode_equals_the_layer(kind, compiled, table):
    """Four decode steps (positions moving across block ends; the first with an idle row, whose n_valid 0 stores
    nothing, the others with n_valid left out), outputs and every cache tensor as the layer's own forward leaves
    them; compiled: each stage traced by torch.compile (aot_eager: the graphs, not inductor's code)."""
    if table == "split" and kind != "csa":
        pytest.skip("only a CSA layer selects")
    layer, cache, x, start = _setup(kind)
    use_kernels(layer, TABLES[table])
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


class _Stream:
    """A stream that only records: its last stage and the stages it was told to wait for."""

    def __init__(self, name):
        self.name, self.last, self.waits = name, None, set()

    def wait_stream(self, other):
        if other.last is not None:
            self.waits.add(other.last)


class _RecordingDevice:
    """The device calls StreamedDecode makes, recording on which stream each stage runs and what it waits for."""

    def __init__(self):
        self.streams = [_Stream("main")]
        self.current = self.streams[0]
        self.stages = []            # (name, stream, stages it directly follows)

    def stream(self):
        self.streams.append(_Stream(f"side{len(self.streams)}"))
        return self.streams[-1]

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def use_stream(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def recorded(self, name, fn):
        def run(*args):
            s = self.current
            self.stages.append((name, s, ({s.last} | s.waits) - {None}))
            s.last, s.waits = len(self.stages) - 1, set()
            return fn(*args)
        return run

    def before(self, i):
        """Every stage that must have finished before stage i starts (the happens-before closure)."""
        seen, todo = set(), list(self.stages[i][2])
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo += self.stages[j][2]
        return {self.stages[j][0] for j in seen}, seen


class _PooledDevice(_RecordingDevice):
    """Streams handed out round robin from a pool of six that holds the main stream, as CUDA's pool holds the stream
    torch.cuda.graph captures on: the first four drawn include it."""

    def __init__(self):
        super().__init__()
        self.pool = self.streams + [_Stream(f"side{i}") for i in range(1, 6)]
        self.drawn = 0

    def stream(self):
        self.drawn += 1
        return self.pool[(self.drawn - 1) % len(self.pool)]


def test_streamed_decode_refuses_a_stream_pool_too_small_for_its_branches():
    """A CSA step needs four distinct side streams: a device whose streams repeat after two is an error, raised when
    the step is made, not a loop without end."""
    dev = _PooledDevice()
    dev.pool = dev.pool[:3]                     # main and two others
    with pytest.raises(RuntimeError, match="distinct side streams"):
        StreamedDecode(_setup("csa")[0], dev, compile=False)
    assert len(StreamedDecode(_setup("hca")[0], _PooledDevice(), compile=False).sides) == 2


def test_side_streams_are_drawn_comparing_as_torch_streams_compare():
    """The draw with torch.Stream objects, whose `!=` against None is False (the draw's first form, `s != avoid`
    with no stream to avoid, refused every stream on an H200 for it): from a pool of six ids that holds the main
    stream's, four distinct side streams, and drawn again apart from main, none of them main."""
    class Pool:
        drawn = 0

        def stream(self):
            self.drawn += 1
            return torch.Stream(stream_id=1 + (self.drawn - 1) % 6, device_index=0, device_type=0)

    main = torch.Stream(stream_id=1, device_index=0, device_type=0)
    step = StreamedDecode(_setup("csa")[0], Pool(), compile=False)
    distinct = lambda sides: not any(a == b for i, a in enumerate(sides) for b in sides[:i])     # noqa: E731
    assert len(step.sides) == 4 and distinct(step.sides) and any(s == main for s in step.sides)
    step._draw_sides(avoid=main)
    assert len(step.sides) == 4 and distinct(step.sides) and not any(s == main for s in step.sides)


# What each stage reads of another's output or of the cache another one writes
NEEDS = {"queries": {"project"}, "token_kv": {"project"}, "index_project": {"project"},
         "index_rotate": {"index_project"}, "pick": {"compress_index", "index_weights", "index_rotate"},
         "index_scores": {"compress_index", "index_weights", "index_rotate"}, "index_select": {"index_scores"}}
# What wq_b's `queries` stage is ordered after in a CSA layer besides `project`: the one order the schedule adds,
# after the indexer's scores where the table splits the selection (so after what they follow), else after its
# query projection (so after the head weights before it on that stream)
QUERIES_AFTER = {"split": {"index_weights", "index_project", "index_rotate", "compress_index", "index_scores"},
                 "fused": {"index_weights", "index_project"}}


@pytest.mark.parametrize("kind,table", [("hca", "fused"), ("csa", "fused"), ("csa", "split")])
@pytest.mark.parametrize("device", [_RecordingDevice, _PooledDevice])
def test_streamed_decode_orders_every_dependency_and_nothing_else(kind, table, device):
    """The schedule itself, which CPU streams cannot exercise: each stage follows the stages it reads from (finish
    all of them), the compressors and the indexer are not ordered after wq_b's `queries` nor it after them (so
    they can overlap) but for the one order the schedule adds (QUERIES_AFTER), and a second step's side stages
    follow the first step's finish (its reads of what they overwrite). With streams from a pool that holds the
    main one, the side streams are drawn again until none is main."""
    layer, cache, x, start = _setup(kind)
    use_kernels(layer, TABLES[table])
    dev = device()
    step = StreamedDecode(layer, dev, compile=False)
    step.stages = {name: dev.recorded(name, fn) for name, fn in step.stages.items()}
    with torch.no_grad():
        step(x, start, cache)
        first = len(dev.stages)
        step(x, start + 1, cache)
    names = [name for name, _, _ in dev.stages[:first]]
    assert set(names) == set(step.stages) and len(names) == len(step.stages)
    at = {name: i for i, name in enumerate(names)}
    for name, needs in NEEDS.items():
        if name in at:
            assert needs <= dev.before(at[name])[0], name
    assert dev.before(at["finish"])[0] == set(names) - {"finish"}
    side_work = {"compress_main", "compress_index", "index_weights", "index_project", "index_rotate", "pick",
                 "index_scores", "index_select", "token_kv"} & set(names)
    assert side_work & dev.before(at["queries"])[0] == (QUERIES_AFTER[table] if kind == "csa" else set())
    assert "queries" not in set().union(*(dev.before(at[n])[0] for n in side_work))
    for name in side_work:
        assert dev.stages[at[name]][1].name != "main" and at["finish"] in dev.before(first + at[name])[1], name


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_decode_side_streams_avoid_the_capture_stream():
    """torch.cuda.graph captures on a stream of the same pool Device.stream() draws from: a StreamedDecode whose
    side stream is that stream (made here by drawing until one is) moves its branches off it when captured, and the
    replay still equals the layer."""
    dev = get_device("cuda")
    layer, cache, x, start = _setup("csa", "cuda", dtype=torch.bfloat16)
    use_kernels(layer, cuda.make_kernels())
    dev.graph().capture(lambda: x + 1, warmup=0)                 # the capture stream exists from here
    capture_stream = torch.cuda.graphs.graph.default_capture_stream
    for _ in range(64):
        step = StreamedDecode(layer, dev, compile=False)
        if any(s == capture_stream for s in step.sides):
            break
    assert any(s == capture_stream for s in step.sides)
    mine = copy.deepcopy(cache)
    with torch.no_grad():
        step(x, start, copy.deepcopy(cache))
        graph = dev.graph()
        out = graph.capture(lambda: step(x, start, mine), warmup=0)
        assert not any(s == capture_stream for s in step.sides)
        graph.replay()
        assert torch.equal(out, layer(x, start, cache))

#!/usr/bin/env python3
"""Per-layer attention decode latency of V4 (CSA and HCA layers) against two baselines measured in the same run.

For each (layer type, batch, context) the whole attention layer's decode step (prolog, compressor, indexer,
sparse attention, epilog) runs from a captured graph with the CUDA backend's kernels, eager ("decode") and, with
`--compile` (the default on CUDA), also compiled by `ascend.backends.cuda.compile_decode` (torch.compile, one
static graph, then captured the same way) and, with `--streams on` (the default), as its stages compiled apart on
concurrent streams (`ascend.backends.streams.StreamedDecode`, captured likewise). The fastest of the three ("best")
is reported as ratios. A step's time is the mean over the last positions of the context (`decode_positions`: an
HCA layer's whole 128-token block, 16 positions for CSA), the steps captured back to back in one graph, as a
model's decode graph runs its layers: the per-token time of a long decode. The step at context - 1 completes a
block (the only one in 128 whose compressor pools, for HCA); replayed alone from an idle device (so with the
host's launch of the graph in it), it is reported too, as the "completing step" columns:

* x roofline = time / max(bytes the step must read / measured copy bandwidth, FLOPs / measured matmul rate),
  where the bytes are the layer's weights plus, per sequence, the KV rows the step reads (window, selected or all
  compressed entries, all visible indexer keys) and the FLOPs the projections plus attention plus indexer scores;
* x dense = time / dense attention over the same context (SDPA, 64 heads over an uncompressed single-head
  512-dim bf16 cache of `context` tokens), also captured (one call per replay: at 0.7 ms and more per call on the
  H200 the launch is under 1%).

Prefill throughput (tokens/s) of one layer over a 128K prompt is reported too, and the peak device memory of
every row. `--stub STAGE` times each step again (eager, and compiled when the row compiles) with one `Kernels` stage
replaced by a stand-in that does no work (`ascend.profiling.STAND_INS`): the difference is what the stage costs
inside the step, which a kernel's time alone or its span in a profile does not tell. `--trials N` compiles and
captures each compiled and streamed step N times afresh and reports the median (compiles of the same code can
differ by more than the change being measured). `--layers csa` (or `hca`) measures one layer type. `--quick` runs
tiny shapes on CPU (graphs are eager re-runs there) to check the script itself.

    python3 scripts/bench_attention.py --out /tmp/bench          # H200: V4-Flash shapes
    python3 scripts/bench_attention.py --quick                   # CPU smoke test
    python3 scripts/bench_attention.py --quick --compile on --compile-backend aot_eager   # checks the compiled path
    python3 scripts/bench_attention.py --stub indexer_topk --contexts 8192 --batches 8,32 --no-kernels --no-prefill
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ascend import profiling
from ascend.argtypes import non_negative, positive, positive_list
from ascend.device import Device, get_device


# ----------------------------------------------------------------------------------------------- measurement
def time_ms(device: Device, fn, reps: int, graph: bool = True) -> float:
    """Median milliseconds of `fn()`; captured once and replayed when `graph` (CPU: eager re-runs). `fn` may be a
    list of functions: they run back to back (one graph), and the time is per function. Each replay is timed from
    an idle device, so a single function's time includes the host launching the graph (2.4-6.8 us of the H200's decode
    steps, docs/performance.md); back to back, as in a whole model's graph, that is paid once per list."""
    fns = fn if isinstance(fn, list) else [fn]

    def run_all():
        return [f() for f in fns]

    if graph:
        g = device.graph()
        g.capture(run_all, warmup=2)
        run = g.replay
    else:
        run_all()
        run = run_all
    times = []
    for _ in range(reps):
        start, end = device.event(), device.event()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def copy_bandwidth(device: Device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device.torch_device)
    dst = torch.empty_like(src)
    ms = time_ms(device, lambda: dst.copy_(src), reps=10, graph=False)
    return 2 * src.nbytes / (ms * 1e-3)


def matmul_rate(device: Device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n x n matrix product on random data."""
    a = torch.randn(n, n, device=device.torch_device, dtype=dtype)
    b = torch.randn(n, n, device=device.torch_device, dtype=dtype)
    ms = time_ms(device, lambda: a @ b, reps=10, graph=False)
    return 2 * n ** 3 / (ms * 1e-3)


def peak_gib(device: Device) -> float:
    return device.memory().peak / 2 ** 30


@dataclass
class Row:
    layer: str
    batch: int
    context: int
    # per step over `decode_positions`, back to back: ms (eager), compiled_ms, streamed_ms, stubbed_ms and
    # stubbed_compiled_ms
    ms: float
    roofline_ms: float
    dense_ms: float
    reference_ms: float | None           # the block-completing step (context - 1) alone
    peak_gib: float
    completing_ms: float | None = None   # the block-completing step replayed alone (from an idle device), eager;
    compiled_completing_ms: float | None = None  # compiled;
    streamed_completing_ms: float | None = None  # streamed
    compiled_ms: float | None = None     # the same step through compile_decode
    compile_s: float | None = None       # its first call (trace, code generation, kernel builds)
    compiled_err: float | None = None    # |compiled - eager| / |eager| of the completing step's output
    compile_error: str | None = None     # why the compiled step could not be timed
    streamed_ms: float | None = None     # the stages compiled apart on concurrent streams (StreamedDecode)
    streamed_s: float | None = None      # its first call
    trials_s: float = 0.0                # --trials: seconds of the compiles after the first ones
    streamed_err: float | None = None    # |streamed - eager| / |eager|
    compiled_trials: list[float] | None = None   # --trials: ms of each fresh compile and capture (compiled_ms and
    streamed_trials: list[float] | None = None   # streamed_ms are their medians)
    profiles: dict | None = None         # --profile: kernels of one captured step, eager and compiled
    stubbed_ms: float | None = None      # --stub: the eager step with that stage's stand-in (None: no --stub, or
    stubbed_compiled_ms: float | None = None     # the layer never calls the stage), and the compiled one
    stub_compile_s: float | None = None  # the first call of the compiled one

    def _best(self) -> tuple[float, float | None]:
        """(per-token ms, completing-step ms) of the variant that is fastest over the positions."""
        timed = [(self.ms, self.completing_ms), (self.compiled_ms, self.compiled_completing_ms),
                 (self.streamed_ms, self.streamed_completing_ms)]
        return min((pair for pair in timed if pair[0] is not None), key=lambda pair: pair[0])

    @property
    def best_ms(self) -> float:
        return self._best()[0]

    @property
    def best_completing_ms(self) -> float | None:
        """The block-completing step alone, of the variant that is fastest over the positions."""
        return self._best()[1]

    @property
    def x_roofline(self) -> float:
        return self.best_ms / self.roofline_ms

    @property
    def x_dense(self) -> float:
        return self.best_ms / self.dense_ms


# ----------------------------------------------------------------------------------------------- one layer
@dataclass(frozen=True)
class Shapes:
    """What a benchmark run covers."""
    preset: str
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill_tokens: int
    prefill_chunk: int
    dtype: torch.dtype
    reps: int
    decode_steps: tuple[int, int]       # (fewest, most) positions each decode step is timed over (`decode_positions`)


FULL = Shapes("flash", (1, 8, 32), (8192, 131072, 1048576), 131072, 16384, torch.bfloat16, 20, (16, 128))
QUICK = Shapes("tiny", (1, 2), (64, 256), 256, 128, torch.float32, 3, (2, 4))


RATIO = {"csa": 4, "hca": 128}       # compress ratio of each layer type


def layer_ids(config) -> dict[str, int]:
    """First CSA (ratio 4) and first HCA (ratio 128) layer of the schedule."""
    return {name: config.compress_ratios.index(r) for name, r in RATIO.items()}


def layer_kinds(text: str) -> tuple[str, ...]:
    """`--layers`: comma-separated layer types, each one of RATIO's."""
    kinds = tuple(k.strip() for k in text.split(","))
    unknown = [k for k in kinds if k not in RATIO]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: expected layer types among "
                                         f"{', '.join(RATIO)}")
    return kinds


def decode_positions(ratio: int, context: int, steps: tuple[int, int]) -> list[int]:
    """The positions a decode step is timed at: the last n before `context`, n = the layer's compress ratio within
    `steps` (and the context). The last (context - 1) completes a compressed block, the only step in `ratio` that
    pools one (an HCA layer's step that does reads its 128 carried rows): at V4-Flash's ratios (4, 128) and
    FULL's (16, 128), 16 CSA positions and an HCA layer's whole block, so their mean is the per-token time of a
    long decode."""
    n = min(max(ratio, steps[0]), steps[1], context)
    return list(range(context - n, context))


def filled_cache(config, layer_id: int, batch: int, context: int, dtype: torch.dtype, device: Device):
    """A layer cache of capacity `context` whose rows hold random entries (decode then sees all of them)."""
    from model.cache import LayerCache

    cache = LayerCache(config, layer_id, batch, context, dtype, device=device.torch_device)
    cache.kv.normal_()
    if cache.index_kv is not None:
        cache.index_kv.normal_()
    return cache


def cache_snapshot(cache) -> Callable[[], None]:
    """A host copy of every tensor of a layer cache; calling the result writes it back. The positions' steps write
    the entries of their blocks with the arithmetic of the variant being timed, so each variant's output to compare
    is taken from the cache as the eager output saw it, not as the previous variant's timing left it."""
    tensors = cache.buffers()
    saved = [t.to("cpu", copy=True) for t in tensors]

    def restore() -> None:
        for t, v in zip(tensors, saved):
            t.copy_(v)
    return restore


def decode_roofline(config, layer, kind: str, batch: int, context: int, dtype: torch.dtype,
                    copy_bps: float, flops_per_s: float) -> tuple[float, float, float]:
    """(seconds, bytes, flops) one decode step must at least take: every weight and every KV row it reads
    once, every multiply-add of its projections, attention and indexer scores once."""
    elt = torch.finfo(dtype).bits // 8
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    matmul_params = sum(m.weight.numel() for m in layer.modules() if hasattr(m, "in_features"))
    d, h = config.head_dim, config.n_heads
    n_entries = context // layer.ratio
    rows = config.window_size + (min(config.index_topk, n_entries) if kind == "csa" else n_entries)
    kv_bytes = rows * d * elt
    flops = 2 * matmul_params + 4 * h * d * rows
    if kind == "csa":
        kv_bytes += n_entries * config.index_head_dim * elt
        flops += 2 * config.index_n_heads * config.index_head_dim * n_entries
    nbytes = weight_bytes + batch * kv_bytes
    flops *= batch
    return max(nbytes / copy_bps, flops / flops_per_s), nbytes, flops


def dense_attention_ms(config, batch: int, context: int, shapes: Shapes, device: Device) -> float:
    """Decode attention of n_heads queries over an uncompressed single-head head_dim cache of `context` tokens."""
    dev = device.torch_device
    q = torch.randn(batch, 1, config.n_heads, config.head_dim, device=dev, dtype=shapes.dtype)
    kv = torch.randn(batch, 1, context, config.head_dim, device=dev, dtype=shapes.dtype)
    ms = time_ms(device, lambda: F.scaled_dot_product_attention(q, kv, kv, scale=config.head_dim ** -0.5),
                 shapes.reps)
    del q, kv
    return ms


def decode_row(layer, config, kind: str, batch: int, context: int, shapes: Shapes, device: Device,
               copy_bps: float, flops_per_s: float, kernels, with_reference: bool,
               compiled_kernels=None, compile_options: dict | None = None, profile_steps: int = 0,
               stub: str | None = None, streams: bool = False, trials: int = 1) -> Row:
    """Time the captured decode step of `layer` at `context` tokens for `batch` sequences, per step over the
    positions of `decode_positions` (the cache's rows filled, each position seeing the entries before it), and the
    block-completing one (context - 1) alone;
    with `compiled_kernels`, also the step compiled by `compile_decode` on them and, with `streams`, its stages
    compiled apart on concurrent streams (`StreamedDecode`). The outputs compared are those of the completing step,
    each from the cache as it was for the eager one (`cache_snapshot`). `profile_steps`:
    also the kernels of that many replays of each captured completing step (CUDA); `stub`: also both steps with
    that `Kernels` stage replaced by its stand-in (`profiling.STAND_INS`), where the layer calls it; `trials`: each
    compiled step compiled and captured that many times afresh, timed as the median (the same code compiled twice
    ran 15% apart on the H200)."""
    from ascend.backends.cuda import compile_decode
    from ascend.backends.streams import StreamedDecode
    from model.kernels import use_kernels
    from model.kernels import REFERENCE

    dev = device.torch_device
    device.reset_peak()
    cache = filled_cache(config, layer.layer_id, batch, context, shapes.dtype, device)
    x = torch.randn(batch, 1, config.dim, device=dev, dtype=shapes.dtype)
    starts = [torch.full((batch,), p, dtype=torch.int64, device=dev)
              for p in decode_positions(layer.ratio, context, shapes.decode_steps)]
    step = functools.partial(layer, x, starts[-1], cache)       # the captured decode step that completes a block

    def timed(call, completing: bool = True) -> tuple[float, float | None]:
        """(ms per step of `call(x, start, cache)` over the positions, back to back; ms of the completing step
        alone, or None without `completing`)."""
        return (time_ms(device, [functools.partial(call, x, s, cache) for s in starts], shapes.reps),
                time_ms(device, functools.partial(call, x, starts[-1], cache), shapes.reps) if completing else None)

    def profile(fn) -> None:
        if profile_steps and device.type == "cuda":
            g = device.graph()
            g.capture(fn, warmup=2)
            row.profiles = {**(row.profiles or {}), name: profiling.kernel_table(g.replay, profile_steps)}

    use_kernels(layer, kernels)
    eager_ms, completing_ms = timed(layer)
    restore = cache_snapshot(cache)
    eager_out = step().float()
    row = Row(kind, batch, context, eager_ms, 0.0, float("nan"), None, 0.0, completing_ms)
    name = "eager"
    profile(step)

    def compiled_step(table, streamed=False, completing=True):
        """The layer compiled on `table` (one graph, or `streamed`: its stages on streams), called once (compiling
        it) and timed: (its first output in float32, seconds of that first call, `timed`'s pair, the completing
        step, None), or (None, seconds, None, None, the error) if it failed, so that the row keeps its other
        numbers."""
        torch._dynamo.reset()            # a fresh compile cache per shape: never the recompile limit
        use_kernels(layer, table)
        options = compile_options or {}
        compiled = StreamedDecode(layer, device, **options) if streamed else compile_decode(layer, **options)
        fn = functools.partial(compiled, x, starts[-1], cache)
        restore()                        # (not counted in the compile time)
        t0 = time.perf_counter()
        try:
            out = fn().float()
            device.synchronize()
            first_s = time.perf_counter() - t0
            return out, first_s, timed(compiled, completing), fn, None
        except Exception as e:  # noqa: BLE001 -- one failing compile keeps the row
            return None, time.perf_counter() - t0, None, None, f"{type(e).__name__}: {str(e)[:300]}"

    def more_trials(first: tuple[float, float], streamed: bool = False) -> tuple[float, float, list[float]]:
        """(median over the positions, median of the completing step, all of the former) of `first` and trials - 1
        more fresh compiles and captures of the step."""
        times = [first]
        for _ in range(trials - 1):
            _, seconds, pair, _, error = compiled_step(compiled_kernels, streamed)
            row.trials_s += seconds
            if pair is None:            # a failed trial is said, not silently left out of the median
                note(error)
            else:
                times.append(pair)
        cycle, completing = zip(*times)
        return statistics.median(cycle), statistics.median(completing), list(cycle)

    def note(error: str) -> None:
        row.compile_error = "; ".join(filter(None, (row.compile_error, error)))

    rel_err = lambda out: ((out - eager_out).norm() / eager_out.norm()).item()   # noqa: E731
    if compiled_kernels is not None:
        out, row.compile_s, times, fn, error = compiled_step(compiled_kernels)
        if out is None:
            note(error)
        else:
            row.compiled_err = rel_err(out)
            name = "compiled"
            profile(fn)
            row.compiled_ms, row.compiled_completing_ms, row.compiled_trials = more_trials(times)
        if streams:
            out, row.streamed_s, times, _, error = compiled_step(compiled_kernels, streamed=True)
            if out is None:
                note(f"streamed: {error}")
            else:
                row.streamed_err = rel_err(out)
                row.streamed_ms, row.streamed_completing_ms, row.streamed_trials = more_trials(times, streamed=True)
        torch._dynamo.reset()
    if stub is not None:
        stand_in, called = profiling.STAND_INS[stub], []

        def recorded(*args, **kwargs):
            called.append(True)
            return stand_in(*args, **kwargs)

        use_kernels(layer, profiling.with_stand_in(kernels, stub, recorded))
        step()                           # does the layer call the stage? (HCA layers have no indexer_topk)
        if called:
            use_kernels(layer, profiling.with_stand_in(kernels, stub))
            row.stubbed_ms = timed(layer, completing=False)[0]
            if row.compiled_ms is not None:
                _, row.stub_compile_s, times, _, error = compiled_step(
                    profiling.with_stand_in(compiled_kernels, stub), completing=False)
                row.stubbed_compiled_ms = None if times is None else times[0]
                if error:
                    note(f"with the {stub} stand-in: {error}")
                torch._dynamo.reset()
    row.peak_gib = peak_gib(device)
    if with_reference:
        use_kernels(layer, REFERENCE)
        row.reference_ms = time_ms(device, step, shapes.reps)
    roof_s, _, _ = decode_roofline(config, layer, kind, batch, context, shapes.dtype, copy_bps, flops_per_s)
    row.roofline_ms = roof_s * 1e3
    return row


def prefill_tokens_per_s(layer, config, shapes: Shapes, device: Device, kernels) -> tuple[float, float]:
    """(tokens/s, peak GiB) of one layer over a `prefill_tokens` prompt, fed in chunks of `prefill_chunk`."""
    from model.kernels import use_kernels
    from model.cache import LayerCache

    use_kernels(layer, kernels)
    dev = device.torch_device
    n, chunk = shapes.prefill_tokens, shapes.prefill_chunk
    cache = LayerCache(config, layer.layer_id, 1, n, shapes.dtype, device=dev)
    x = torch.randn(1, n, config.dim, device=dev, dtype=shapes.dtype)

    def prefill():
        cache.reset()
        for s in range(0, n, chunk):
            layer(x[:, s:s + chunk], torch.full((1,), s, dtype=torch.int64, device=dev), cache)

    device.reset_peak()
    ms = time_ms(device, prefill, reps=1, graph=False)     # runs once untimed first (compile, allocate)
    return n / (ms * 1e-3), peak_gib(device)


# ----------------------------------------------------------------------------------------------- kernels alone
SPARSE_VARIANTS = {"h32 k32 w8": dict(block_h=32, block_k=32, num_warps=8, waves=2.0),
                   "h16 k32 w4": dict(block_h=16, block_k=32, num_warps=4, waves=2.0),
                   "h16 k64 w4 waves1": dict(block_h=16, block_k=64, num_warps=4, waves=1.0),
                   "h64 k32 w8": dict(block_h=64, block_k=32, num_warps=8, waves=2.0),
                   "h32 k64 w8": dict(block_h=32, block_k=64, num_warps=8, waves=2.0),
                   "h32 k32 w8 waves4": dict(block_h=32, block_k=32, num_warps=8, waves=4.0),
                   "h32 k32 w4": dict(block_h=32, block_k=32, num_warps=4, waves=2.0),
                   "h64 k64 w8 waves1": dict(block_h=64, block_k=64, num_warps=8, waves=1.0),
                   "h64 k64 w8 waves1 wgmma": dict(block_h=64, block_k=64, num_warps=8, waves=1.0, wgmma=True)}
INDEXER_VARIANTS = {"t64 w4": dict(block_t=64, num_warps=4),
                    "t128 w4": dict(block_t=128, num_warps=4),
                    "t64 w4 parts 4/SM s3": dict(block_t=64, num_warps=4, per_sm=4, num_stages=3),
                    "t128 w4 parts 2/SM s3": dict(block_t=128, num_warps=4, per_sm=2, num_stages=3),
                    "t128 w8 parts 4/SM s3": dict(block_t=128, num_warps=8, per_sm=4, num_stages=3)}


@dataclass
class KernelRow:
    kernel: str
    layer: str
    batch: int
    context: int
    variant: str
    ms: float
    roofline_ms: float
    reference_ms: float


def kernel_rows(config, kind: str, batch: int, context: int, shapes: Shapes, device: Device, copy_bps: float,
                flops_per_s: float, triton: bool) -> list[KernelRow]:
    """The decode-step sparse_attn (and, for CSA, indexer_topk) alone: each Triton launch variant, the PyTorch
    version and the reference, captured; roofline = rows read once (and scores written once) vs FLOPs. Then the
    indexer's selection stages (CSA)."""
    from ascend.backends import cuda
    from model.kernels import REFERENCE

    dev, dt = device.torch_device, shapes.dtype
    h, d, win = config.n_heads, config.head_dim, config.window_size
    n_entries = context // RATIO[kind]
    selected = min(config.index_topk, n_entries) if kind == "csa" else n_entries
    q = torch.randn(batch, 1, h, d, device=dev, dtype=dt)
    kv = torch.randn(batch, win + n_entries + 1, d, device=dev, dtype=dt)
    ring = torch.arange(win, device=dev).expand(batch, 1, win)
    entries = win + torch.stack([torch.randperm(n_entries, device=dev)[:selected] for _ in range(batch)]).unsqueeze(1)
    idx = torch.cat([ring, entries], -1).int()
    sink = torch.randn(h, device=dev)
    k_rows = idx.size(-1)
    roof = max(batch * k_rows * d * kv.element_size() / copy_bps, 4 * batch * h * d * k_rows / flops_per_s) * 1e3
    args = (q, kv, idx, sink, d ** -0.5)
    ref = time_ms(device, lambda: REFERENCE.sparse_attn(*args), shapes.reps)
    rows = [KernelRow("sparse_attn", kind, batch, context, "pytorch sdpa",
                      time_ms(device, lambda: cuda.sparse_attn_sdpa(*args), shapes.reps), roof, ref)]
    if triton:
        from ascend.backends import gluon_sparse_attn, triton_sparse_attn as tsa
        from ascend.backends.triton_common import capability, shared_memory
        # the variant `cuda.sparse_attn_config` picks for this shape is the backend's (each of its settings is here)
        picked = cuda.sparse_attn_setting(q, k_rows)

        def runs(variant: dict) -> bool:      # the Gluon kernel is Hopper's, bf16 / fp16 (--quick runs float32)
            return not variant.get("wgmma") or gluon_sparse_attn.supports(
                capability(dev), q.element_size(), d, variant["block_h"], variant["block_k"], variant["num_warps"],
                shared_memory(dev))

        for name, variant in filter(lambda item: runs(item[1]), SPARSE_VARIANTS.items()):
            ms = time_ms(device, lambda: tsa.sparse_attn(*args, **variant), shapes.reps)
            label = f"triton {name}" + (" (backend)" if variant == picked else "")
            rows.append(KernelRow("sparse_attn", kind, batch, context, label, ms, roof, ref))
    if kind == "csa":
        di, hi = config.index_head_dim, config.index_n_heads
        iq = torch.randn(batch, 1, hi, di, device=dev, dtype=dt)
        # as the layer's keys (`LayerCache.index_keys`): a view of n_entries rows of a buffer with one row more
        ik = torch.randn(batch, n_entries + 1, di, device=dev, dtype=dt)[:, :n_entries]
        w = torch.randn(batch, 1, hi, device=dev)
        nv = torch.full((batch, 1), n_entries, device=dev)
        roof = max(batch * n_entries * (di * ik.element_size() + 8) / copy_bps,
                   2 * batch * hi * di * n_entries / flops_per_s) * 1e3
        iargs = (iq, ik, w, nv)
        topk = config.index_topk
        ref = time_ms(device, lambda: REFERENCE.indexer_topk(*iargs, topk), shapes.reps)
        rows.append(KernelRow("indexer_topk", kind, batch, context, "pytorch bmm",
                              time_ms(device, lambda: cuda.indexer_topk_bmm(*iargs, topk), shapes.reps), roof, ref))
        if triton:
            for name, variant in {"backend": cuda.INDEXER_CONFIG, **INDEXER_VARIANTS}.items():
                fn = lambda: cuda.topk_triton(tsa.indexer_scores(*iargs, **variant), topk)  # noqa: E731
                rows.append(KernelRow("indexer_topk", kind, batch, context, f"triton {name}",
                                      time_ms(device, fn, shapes.reps), roof, ref))
        rows += selection_rows(kind, batch, context, cuda.indexer_scores_bmm(*iargs), topk, iq, config.rope_head_dim,
                               shapes, device, copy_bps, triton)
    return rows


def selection_rows(kind: str, batch: int, context: int, scores: torch.Tensor, topk: int, iq: torch.Tensor,
                   rope_dim: int, shapes: Shapes, device: Device, copy_bps: float, triton: bool) -> list[KernelRow]:
    """The indexer's small stages alone: top-k of the scores (torch.topk vs the Triton radix select, the backend's
    choice, cooperative where it applies, and the launch per byte); the Hadamard
    rotation of its queries and of its new entries (two rows per sequence at decode), as the reference butterfly, a
    float32 matmul and the bf16 +-1 matmul of the CUDA backend's `hadamard`; and their whole rotation (RoPE,
    Hadamard, FP4 simulation: `Kernels.index_rotate`, which the Triton tables run) as the eager table's three stages
    and as the one Triton launch."""
    from ascend.backends import cuda
    from model.kernels import REFERENCE, rotate_index, select_topk

    roof = scores.numel() * 4 / copy_bps * 1e3
    ref = time_ms(device, lambda: select_topk(scores, topk), shapes.reps)
    rows = [KernelRow("topk", kind, batch, context, "torch.topk alone (no -1 / int32; own tie order)", time_ms(
        device, lambda: scores.topk(topk, dim=-1), shapes.reps), roof, ref)]
    if triton:
        from ascend.backends import triton_sparse_attn
        rows.append(KernelRow("topk", kind, batch, context, "triton radix select (backend)", time_ms(
            device, lambda: cuda.topk_triton(scores, topk), shapes.reps), roof, ref))
        rows.append(KernelRow("topk", kind, batch, context, "triton radix select, a launch per byte", time_ms(
            device, lambda: triton_sparse_attn.topk(scores, topk, cooperative=False), shapes.reps), roof, ref))
    tables = [("eager stages (rope, hadamard, fp4)", cuda.make_kernels(use_triton=False))]
    tables += [("triton, one launch (backend)", cuda.make_kernels(use_triton=True))] if triton else []
    for what, x in (("queries", iq), ("entries", iq[:, 0, :2])):            # entries: [B, N, D], keys as one head
        roof = 2 * x.numel() * x.element_size() / copy_bps * 1e3
        ref = time_ms(device, lambda: REFERENCE.hadamard(x), shapes.reps)
        for name, fn in (("float32 matmul", lambda: cuda.hadamard_matmul(x.float()).to(x.dtype)),
                         ("bf16 +-1 matmul (backend hadamard)", lambda: cuda.hadamard_matmul(x))):
            rows.append(KernelRow(f"hadamard {what}", kind, batch, context, name,
                                  time_ms(device, fn, shapes.reps), roof, ref))
        angles = torch.rand(*x.shape[:2], rope_dim // 2, device=x.device) * 6.3
        cos, sin = angles.cos(), angles.sin()
        ref = time_ms(device, lambda: rotate_index(REFERENCE, x, cos, sin, True), shapes.reps)
        for name, table in tables:
            rows.append(KernelRow(f"index_rotate {what}", kind, batch, context, name, time_ms(
                device, lambda: rotate_index(table, x, cos, sin, True), shapes.reps), roof, ref))
    return rows


def compressor_rows(config, kind: str, batch: int, context: int, shapes: Shapes, device: Device, copy_bps: float,
                    triton: bool) -> list[KernelRow]:
    """The main compressor's pooling step alone (`compress_blocks` at one token per sequence, the same at every
    context): the reference's staging against the CUDA backend's Triton step, for a token inside its block and for
    one that completes it (each replay then pools and advances the state again). Roofline: the float32 kv and score
    rows the step must read and write (the token's row; with a completed block, the block's rows too)."""
    from ascend.backends import cuda
    from model.cache import CompressorState
    from model.kernels import REFERENCE

    dev, ratio = device.torch_device, RATIO[kind]
    overlap = ratio == 4
    width = (2 if overlap else 1) * config.head_dim
    carried = CompressorState.empty(batch, ratio, width, dev)        # the cache's layout, random values
    state = [carried.kv.normal_(), carried.score.normal_()]
    kv, score = (torch.randn(batch, 1, width, device=dev) for _ in range(2))
    n_valid = torch.ones(batch, dtype=torch.int64, device=dev)
    rows = []
    for what, pos, touched in (("inside a block", 100 * ratio + 1, 1),
                               ("completing it", 101 * ratio - 1, (1 + overlap) * ratio)):
        args = (kv, score, torch.full((batch,), pos, device=dev), n_valid, *state, ratio, overlap)
        roof = batch * touched * width * 2 * 4 * 2 / copy_bps * 1e3
        ref = time_ms(device, lambda: REFERENCE.compress_blocks(*args), shapes.reps)
        rows.append(KernelRow(f"compress_blocks ({what})", kind, batch, context, "reference staging", ref, roof, ref))
        if triton:
            rows.append(KernelRow(f"compress_blocks ({what})", kind, batch, context, "triton step", time_ms(
                device, lambda: cuda.compress_blocks_triton(*args), shapes.reps), roof, ref))
    return rows


# ----------------------------------------------------------------------------------------------- report
def kernel_table(rows: list[KernelRow]) -> str:
    lines = ["| kernel | layer | batch | context | implementation | us | x roofline | speedup vs reference |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.layer} | {r.batch} | {r.context} | {r.variant} | {r.ms * 1e3:.1f} | "
                     f"{r.ms / r.roofline_ms:.2f} | {r.reference_ms / r.ms:.2f} |")
    return "\n".join(lines)


def table(rows: list[Row], prefill: dict[str, tuple[float, float]], ceilings: dict[str, float]) -> str:
    options = f", inductor options {ceilings['inductor']}" if ceilings.get("inductor") else ""
    profiled = ("; with --profile: these step times read slower than a run's without it"
                if ceilings.get("profile_steps") else "")
    stub = ceilings.get("stub")
    trials = ceilings.get("trials", 1) > 1
    trial_note = f"; compiled and streamed: medians of {ceilings.get('trials')} compiles each" if trials else ""
    lines = [f"copy bandwidth {ceilings['copy_GBps']:.0f} GB/s, matmul {ceilings['matmul_TFLOPs']:.3g} TFLOP/s "
             f"({ceilings['device']}){options}{profiled}{trial_note}; decode us: per step over the last "
             "positions of the context, back to back (one graph), but the completing step's and the reference's: "
             "the step at context - 1 replayed alone", "",
             "| layer | batch | context | eager us | compiled us | streamed us | eager / best | roofline us | "
             "best x roofline | best's completing step alone us | its x roofline | eager x roofline | dense us | "
             "best x dense | reference-kernels us | compile s | compiled err | streamed err | peak GiB |"
             + (f" {stub} in the eager step us | {stub} in the compiled step us |" if stub else "")
             + (" compiled range us | streamed range us |" if trials else ""),
             "|---|" + "---:|" * (18 + 2 * bool(stub) + 2 * trials)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
    us = lambda ms: "-" if ms is None else f"{ms * 1e3:.1f}"   # noqa: E731
    cost = lambda whole, without: None if whole is None or without is None else (whole - without) * 1e3  # noqa: E731
    spread = lambda times: "-" if not times else f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r.layer} | {r.batch} | {r.context} | {us(r.ms)} | {us(r.compiled_ms)} | "
                     f"{us(r.streamed_ms)} | {r.ms / r.best_ms:.2f} | {us(r.roofline_ms)} | {r.x_roofline:.2f} | "
                     f"{us(r.best_completing_ms)} | {r.best_completing_ms / r.roofline_ms:.2f} | "
                     f"{r.ms / r.roofline_ms:.2f} | {us(r.dense_ms)} | {r.x_dense:.3f} | {us(r.reference_ms)} | {fmt(r.compile_s, '.1f')} | "
                     f"{fmt(r.compiled_err, '.1e')} | {fmt(r.streamed_err, '.1e')} | {r.peak_gib:.2f} |"
                     + (f" {fmt(cost(r.ms, r.stubbed_ms), '.1f')} | "
                        f"{fmt(cost(r.compiled_ms, r.stubbed_compiled_ms), '.1f')} |" if stub else "")
                     + (f" {spread(r.compiled_trials)} | {spread(r.streamed_trials)} |" if trials else ""))
    lines += ["", "| layer | prefill tokens | tokens/s | peak GiB |", "|---|---:|---:|---:|"]
    for kind, (tps, peak) in prefill.items():
        lines.append(f"| {kind} | {ceilings['prefill_tokens']} | {tps:,.0f} | {peak:.2f} |")
    return "\n".join(lines)


def inductor_option(text: str) -> tuple[str, object]:
    """`--inductor KEY=VALUE`: VALUE as a Python literal (True, 4, "x"), else as the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--inductor {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--device", default=None, help="auto|cuda|npu|cpu (default: cpu with --quick, else auto)")
    p.add_argument("--batches", type=positive_list, default=None)
    p.add_argument("--contexts", type=positive_list, default=None)
    p.add_argument("--no-reference", action="store_true", help="skip the reference-kernels column")
    p.add_argument("--layers", type=layer_kinds, default=tuple(RATIO), metavar="KINDS",
                   help=f"layer types to measure, comma-separated (default {','.join(RATIO)})")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill measurement")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-kernel variant table")
    p.add_argument("--compile", choices=("on", "off"), default=None,
                   help="also time the step compiled by compile_decode (default: on for CUDA, off elsewhere)")
    p.add_argument("--streams", choices=("on", "off"), default="on",
                   help="with --compile, also time the layer's stages compiled apart on concurrent streams "
                        "(ascend.backends.streams.StreamedDecode)")
    p.add_argument("--trials", type=positive, default=1,
                   help="compile and capture each compiled / streamed step this many times afresh and report the "
                        "median, the range in the table (on the H200 the same code compiled in two jobs read 181 "
                        "and 216 us at CSA batch 32 and 8K, while captures of one compile agree to a few us)")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of compilation after which the remaining rows are timed eagerly only")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled step (aot_eager: trace only, for quick checks)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE", type=inductor_option,
                   help="an inductor config option for the compiled step (repeatable), e.g. combo_kernels=True")
    p.add_argument("--profile", type=non_negative, default=0, metavar="STEPS",
                   help="CUDA: print the kernels of this many replays of each captured step, eager and compiled "
                        "(the timings of such a run read slower: on the H200 the same code's compiled steps took "
                        "5-30 us more in a run with --profile than in runs without; take timings from a run "
                        "without it)")
    p.add_argument("--stub", choices=sorted(profiling.STAND_INS), default=None, metavar="STAGE",
                   help="also time each step with this Kernels stage replaced by a stand-in that does no work "
                        f"({', '.join(sorted(profiling.STAND_INS))}): the difference is the stage's cost inside "
                        "the step (a row whose layer never calls the stage shows '-'; the compiled step is "
                        "compiled once more, within --compile-budget)")
    p.add_argument("--out", type=Path, default=None,
                   help="also write bench_attention.md, .json, and .jsonl (each result as it comes) here")
    args = p.parse_args(argv)
    if args.inductor and args.compile_backend != "inductor":
        p.error(f"--inductor: options of the inductor backend, not of --compile-backend {args.compile_backend}")

    from ascend.backends.cuda import make_kernels
    from ascend.onnx_export import synthetic_attention
    from model.config import ModelConfig

    shapes = QUICK if args.quick else FULL
    device = get_device(args.device or ("cpu" if args.quick else None))
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    batches = args.batches or shapes.batches
    contexts = args.contexts or shapes.contexts
    config = ModelConfig.preset(shapes.preset, dtype="bf16", max_seq_len=max(contexts + (shapes.prefill_tokens,)))
    use_triton = None if device.type == "cuda" else False     # None: Triton when it imports
    kernels = make_kernels(use_triton)
    compiled_kernels = None
    if (args.compile or ("on" if device.type == "cuda" else "off")) == "on":
        compiled_kernels = make_kernels(use_triton, for_compile=True)
    big = device.type != "cpu"
    copy_bps = copy_bandwidth(device, 2 ** 30 if big else 2 ** 26)
    flops_per_s = matmul_rate(device, 8192 if big else 512, shapes.dtype)
    ceilings = {"device": device.name, "copy_GBps": copy_bps / 1e9, "matmul_TFLOPs": flops_per_s / 1e12,
                "prefill_tokens": shapes.prefill_tokens, "inductor": dict(args.inductor), "profile_steps": args.profile,
                "stub": args.stub, "trials": args.trials}

    rows, prefill, dense, failures = [], {}, {}, []

    def log(record: dict) -> None:
        """Append each result as it comes, so a run cut short still leaves its numbers."""
        if args.out:
            with open(args.out / "bench_attention.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_attention.jsonl").unlink(missing_ok=True)     # this run's results only
        log({"ceilings": ceilings})
    layers = {kind: synthetic_attention(config, layer_id, device.torch_device)
              for kind, layer_id in layer_ids(config).items() if kind in args.layers}
    compile_options = {"backend": args.compile_backend}
    if args.inductor:
        compile_options["options"] = dict(args.inductor)
    compile_s = 0.0
    for context in contexts:              # both layer types per shape: a run cut short still covers both
        for batch in batches:
            for kind, layer in layers.items():
                within_budget = args.compile_budget is None or compile_s < args.compile_budget
                try:
                    row = decode_row(layer, config, kind, batch, context, shapes, device, copy_bps, flops_per_s,
                                     kernels, not args.no_reference, compiled_kernels if within_budget else None,
                                     compile_options, args.profile, args.stub, args.streams == "on", args.trials)
                except Exception as e:  # noqa: BLE001 -- one failing shape (e.g. out of memory) keeps the rest
                    print(f"{kind} batch {batch} context {context}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
                    failures.append(f"{kind} b{batch} ctx{context}: {type(e).__name__}: {str(e)[:200]}")
                    device.empty_cache()
                    continue
                device.empty_cache()
                compile_s += sum(t or 0.0 for t in (row.compile_s, row.streamed_s, row.stub_compile_s, row.trials_s))
                if row.compile_error:
                    failures.append(f"{kind} b{batch} ctx{context} compiled: {row.compile_error}")
                if (batch, context) not in dense:
                    dense[batch, context] = dense_attention_ms(config, batch, context, shapes, device)
                    device.empty_cache()
                row.dense_ms = dense[batch, context]
                rows.append(row)
                log({"decode": asdict(row)})
                print(f"{kind} batch {batch} context {context}: {row.ms * 1e3:.1f} us eager"
                      + ("" if row.compiled_ms is None else
                         f", {row.compiled_ms * 1e3:.1f} us compiled ({row.compile_s:.0f} s to compile)"),
                      file=sys.stderr)
    rows.sort(key=lambda r: (list(layers).index(r.layer), r.context, r.batch))
    for kind, layer in layers.items():
        if not args.no_prefill:
            try:
                prefill[kind] = prefill_tokens_per_s(layer, config, shapes, device, kernels)
                log({"prefill": kind, "tokens_per_s": prefill[kind][0], "peak_gib": prefill[kind][1]})
            except Exception as e:  # noqa: BLE001
                print(f"{kind} prefill: FAILED {type(e).__name__}: {e}", file=sys.stderr)
                failures.append(f"{kind} prefill: {type(e).__name__}: {str(e)[:200]}")
    del layers
    device.empty_cache()

    krows = []
    if not args.no_kernels:
        from ascend.backends.cuda import triton_available
        for kind in ("csa", "hca"):
            for context in contexts:
                for batch in batches:
                    try:
                        triton = device.type == "cuda" and triton_available()
                        new = kernel_rows(config, kind, batch, context, shapes, device, copy_bps, flops_per_s, triton)
                        if context == contexts[0]:      # the compressor's step is the same at every context
                            new += compressor_rows(config, kind, batch, context, shapes, device, copy_bps, triton)
                        krows += new
                        for r in new:
                            log({"kernel": asdict(r)})
                    except Exception as e:  # noqa: BLE001
                        print(f"kernels {kind} b{batch} ctx{context}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
                        failures.append(f"kernels {kind} b{batch} ctx{context}: {type(e).__name__}: {str(e)[:200]}")
                    device.empty_cache()

    text = table(rows, prefill, ceilings) + "\n\n" + kernel_table(krows) + "".join(f"\nFAILED {f}" for f in failures)
    for r in rows:
        for name, t in (r.profiles or {}).items():
            text += "\n\n" + profiling.format_kernel_table(t, f"{name} {r.layer} step, batch {r.batch}, "
                                                                 f"context {r.context}")
    print(text)
    if args.out:
        (args.out / "bench_attention.md").write_text(text + "\n")
        (args.out / "bench_attention.json").write_text(json.dumps({
            "ceilings": ceilings, "shapes": {**asdict(shapes), "dtype": str(shapes.dtype)},
            "decode": [{**asdict(r), "x_roofline": r.x_roofline, "x_dense": r.x_dense,
                        "best_completing_ms": r.best_completing_ms} for r in rows],
            "prefill": {k: {"tokens_per_s": v[0], "peak_gib": v[1]} for k, v in prefill.items()},
            "kernels": [asdict(r) for r in krows], "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2

"""One attention layer's decode step as its stages on concurrent streams of the device.

At decode (batch 8-32) a layer is a chain of launches: three bandwidth-bound 64 MB projections (wq_b, wo_a,
wo_b) and dozens of small, latency-bound kernels that leave most of the device idle. Only the query path leads
to wq_b; the window kv, the compressors and, in a CSA layer, the indexer need nothing of it but the low-rank
query qr, and sparse attention is the first stage that needs them. So they run beside it:

    main    project ──┬──► queries (wq_b, norm, RoPE) ─────────────────────────────────► attend + epilog
                      ├──► token_kv (kv norm, RoPE, FP8) ───────────────────────────────────▲ (side 1)
    side 2  compress_main (compressor projection, pooling, norm, RoPE, FP8, cache write) ───┤
    side 3  compress_index (the indexer's compressor) ────────────────► pick (scores, top-k) ┤   CSA only
    side 4  index weights (weights_proj) ─┴─► index queries (wq_b, RoPE, Hadamard, FP4) ──┘

(`model.attention.Attention` names the stages; its `forward` runs the same ones one after another.) Each stage
is compiled on its own (`compile_decode`: inductor fuses within a stage, not across), and the step is meant to be
captured as one graph (`Device.graph()`): the forks and joins become edges of that graph, and a replay runs the
branches concurrently. Measured on an H200 at V4-Flash shapes (docs/performance.md): the stages compiled apart
but on one stream were 4-10 us slower than the one-graph compile of the whole layer (the fusion lost at their
borders); on these streams 15-25 us (HCA) and 40-70 us (CSA) faster. Waiting for the indexer's inputs before wq_b
(so that the projection does not take the SMs the small kernels wait for) and high-priority side streams were
no faster.

Streams come from the device layer (`Device.stream()`), so on CPU the branches simply run in order, and on an NPU
they are torch_npu streams (not run on an NPU). Memory stays safe across streams without `record_stream`: every
tensor one branch hands to another is held until the step returns, each step starts with the side streams waiting
for the main one and ends with the main one waiting for them, so a block freed at the end of one step is reused
only by work ordered after everything that read it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ascend.device import Device
from model.attention import Attention
from model.cache import LayerCache

__all__ = ["StreamedDecode"]


def _chunk(x: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor | None):
    """positions [B, S] and n_valid [B] of a chunk (all S tokens valid by default), as `Attention.forward`."""
    positions = start[:, None] + torch.arange(x.size(1), device=x.device)
    return positions, torch.full_like(start, x.size(1)) if n_valid is None else n_valid


class StreamedDecode:
    """`step(x, start, cache, n_valid=None)` == `layer(x, start, cache, n_valid)`, its stages on up to five streams
    (the caller's, one for the window kv, one per compressor, one for the indexer's queries and weights).

    compile: each stage through `ascend.backends.cuda.compile_decode` (`options` go to torch.compile), else the
    layer's own eager stages (the schedule alone).
    """

    def __init__(self, layer: Attention, device: Device, compile: bool = True, **options):
        self.layer = a = layer
        self.device = device

        # The stages as functions of the step's arguments. positions and n_valid are rebuilt inside each stage
        # that needs them: computed once ahead of the fork they would be launches on the path every branch waits for.
        def project(x, start):
            return a.project(x, _chunk(x, start, None)[0])

        def compress_main(x, start, n_valid, cache):
            a.compress_main(x, start, _chunk(x, start, n_valid)[1], cache)

        def compress_index(x, start, n_valid, cache):
            a.compress_index(x, start, _chunk(x, start, n_valid)[1], cache)

        def pick(index_q, weights, x, start, cache):
            return a.pick(index_q, weights, _chunk(x, start, None)[0], cache)

        def finish(q, kv, cos, sin, x, start, n_valid, entry_rows, cache):
            positions, n_valid = _chunk(x, start, n_valid)
            if a.ratio and a.indexer is None:           # HCA: every visible entry
                entry_rows = a.select(x, None, positions, cos, sin, cache)
            return a.epilog(a.attend(q, kv, positions, start, n_valid, entry_rows, cache), cos, sin)

        stages = dict(project=project, queries=a.queries, token_kv=a.token_kv, compress_main=compress_main,
                      finish=finish)
        if a.indexer is not None:
            stages.update(compress_index=compress_index, index_weights=a.indexer.weights,
                          index_queries=a.indexer.queries, pick=pick)
        if compile:
            from ascend.backends.cuda import compile_decode
            stages = {name: compile_decode(fn, **options) for name, fn in stages.items()}
        self.stages = stages
        self.sides = [device.stream() for _ in range(4 if a.indexer is not None else 2 if a.ratio else 1)]

    def __call__(self, x: torch.Tensor, start: torch.Tensor, cache: LayerCache,
                 n_valid: torch.Tensor | None = None) -> torch.Tensor:
        dev, a, f = self.device, self.layer, self.stages
        main = dev.current_stream()
        for s in self.sides:
            s.wait_stream(main)
        kv_side, *compress_sides = self.sides
        entry_rows = None
        if a.ratio:
            with dev.use_stream(compress_sides[0]):
                f["compress_main"](x, start, n_valid, cache)
        if a.indexer is not None:
            _, index_keys_side, index_side = compress_sides
            with dev.use_stream(index_keys_side):
                f["compress_index"](x, start, n_valid, cache)
            with dev.use_stream(index_side):
                weights = f["index_weights"](x)
        qr, kv, cos, sin = f["project"](x, start)
        kv_side.wait_stream(main)
        with dev.use_stream(kv_side):
            kv = f["token_kv"](kv, cos, sin)
        if a.indexer is not None:
            index_side.wait_stream(main)
            with dev.use_stream(index_side):
                index_q = f["index_queries"](qr, cos, sin)
            index_keys_side.wait_stream(index_side)
            with dev.use_stream(index_keys_side):
                entry_rows = f["pick"](index_q, weights, x, start, cache)
        q = f["queries"](qr, cos, sin)
        for s in self.sides:
            main.wait_stream(s)
        # the branches' tensors (qr, kv, cos, sin, weights, index_q, entry_rows) are freed at return, after the joins
        return f["finish"](q, kv, cos, sin, x, start, n_valid, entry_rows, cache)

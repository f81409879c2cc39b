"""One attention layer's decode step as its stages on concurrent streams of the device.

At decode (batch 8-32) a layer is a chain of launches: three bandwidth-bound 64 MB projections (wq_b, wo_a,
wo_b) and dozens of small, latency-bound kernels that leave most of the device idle. Only the query path leads
to wq_b; the window kv, the compressors and, in a CSA layer, the indexer need nothing of it but the low-rank
query qr, and sparse attention is the first stage that needs them. So they run beside it:

    main     project ────────────────────────────────────────────► queries (wq_b, norm, RoPE) ────► attend + epilog
                │ wkv, qr, cos, sin                                ▲ (CSA: after the scores)        ▲ (joins all)
    kv       token_kv (kv norm, RoPE, FP8 rounding)                │                                │
    compress compress_main (the compressor, cache write)           │                                │
    keys     compress_index (the indexer's compressor) ─┴► scores ─┬► top-k ────────────────────────┘  CSA only
    index    weights ─► projection (wq_b) ─► rotation ──┘

The one order between branches that no data dependency asks for: in a CSA layer wq_b (64 MB) waits for the
indexer's scores, so that it runs beside the top-k, which reads little (a few block-wide reductions and barriers),
and not beside the bandwidth-bound stages before it on the selection's path, the step's critical one: the index
projection (16 MB) and the scores, which read the indexer's keys (at batch 8 4 MB at 8K, 67 MB at 128K, 537 MB at
1M). On an H200 at V4-Flash shapes (docs/performance.md; the same compiled stages in one process, session 27's job
3), per token against waiting for the index projection: batch 8 / 32 at 8K 123.7 / 145.4 against 125.2 / 145.5
us, at 128K 161.7 / 247.7 against 168.2 / 260.1, at 1M 331.9 / 836.0 against 332.3 / 878.8 (waiting for the query
rotation between the two: 124.5 / 154.8, 165.0 / 253.7, 329.5 / 858.0). That needs the scores and the top-k as
two stages: where the kernels table has the selection as one operator (`Indexer.splits` false: the NPU's lightning
indexer) wq_b waits for the index projection instead, which beside wq_b had taken 22 us against 7 alone (batch 8,
8K; the selection then started late).

(`model.attention.Attention` names the stages; its `forward` runs the same ones one after another.) Each stage
is compiled on its own (`compile_decode`: inductor fuses within a stage, not across), and the step is meant to be
captured as one graph (`Device.graph()`): the forks and joins become edges of that graph, and a replay runs the
branches concurrently. On an H200 at V4-Flash shapes (docs/performance.md), against the whole layer compiled as
one graph: the stages compiled apart on one stream were 4-10 us slower (the fusion lost at their borders), on
these streams 17-63 us (HCA) and 35-69 us (CSA) faster at batch 8 and 32 from 8K to 1M tokens in the five jobs
on this form (9bb50ce's, per token over the last 128 (HCA) / 16 (CSA) positions: 19-63 and 38-49; in a first job on an earlier one, HCA
batch 32 at 1M only 4 us). Not kept:
high-priority side streams (no faster); wq_b waiting for the indexer's whole query path (then its projection
and a six-launch FP4 simulation; 8-18 us slower at CSA batch 8; at batch 32 from 1 us slower to 9 us faster;
measured before the side streams were kept off the capture stream, so possibly with that collision); the
tokens' cos / sin on the kv stream beside the joint projection (wq_b starts earlier, but HCA steps were 1-4 us
slower: the compressor's branch then ends last); part of wo_a read into L2 on a side stream after wq_b (HCA
2-24 us slower).

Streams come from the device layer (`Device.stream()`), so on CPU the branches simply run in order, and on an NPU
they are torch_npu streams (not run on an NPU). Memory stays safe across streams without `record_stream`: every
tensor one branch hands to another is held until the step returns, past the joins; each step starts with the side
streams waiting for the main one, so a block freed at the end of one step is reused only by work ordered after
everything that read it.
"""

from __future__ import annotations

import torch

from ascend.device import Device
from model.attention import Attention, chunk_positions
from model.cache import LayerCache

__all__ = ["StreamedDecode"]

SIDE_STREAM_DRAWS = 64      # streams asked of the device for one set of side streams at most (torch's pool: 32)


class StreamedDecode:
    """`step(x, start, cache, n_valid=None)` == `layer(x, start, cache, n_valid)` for decode steps (x [B, 1, dim]),
    its stages on up to five streams: the caller's, one for the window kv, one for the main compressor, one for the
    indexer's compressor and then its selection (scores, top-k), one for the indexer's weights and queries (the main
    stream's wq_b waits for the scores, or for the queries' projection where the selection is one operator).

    compile: each stage through `ascend.backends.cuda.compile_decode` (`options` go to it, and through it to
    torch.compile), else the layer's own eager stages (the schedule alone).
    """

    def __init__(self, layer: Attention, device: Device, compile: bool = True, **options):
        self.layer = a = layer
        self.device = device

        # The stages as functions of the step's arguments. positions and n_valid are rebuilt inside each stage
        # that needs them: computed once ahead of the fork they would be launches on the path every branch waits for.
        def project(x, start):
            return a.project(x, chunk_positions(x, start)[0])

        def compress_main(x, start, n_valid, cache):
            a.compress_main(x, start, chunk_positions(x, start, n_valid)[1], cache)

        def compress_index(x, start, n_valid, cache):
            a.compress_index(x, start, chunk_positions(x, start, n_valid)[1], cache)

        def pick(index_q, weights, x, start, cache):
            return a.pick(index_q, weights, chunk_positions(x, start)[0], cache)

        def index_scores(index_q, weights, x, start, cache):
            return a.indexer.scores(index_q, weights, chunk_positions(x, start)[0], cache.index_keys())

        def finish(q, kv, cos, sin, x, start, n_valid, entry_ids, cache):
            positions, n_valid = chunk_positions(x, start, n_valid)
            if entry_ids is None:                       # not picked by the indexer: HCA's every visible entry, or none
                entry_rows = a.select(x, None, positions, cos, sin, cache)
            else:                                       # the indexer's picks as rows, fused with the rows' join
                entry_rows = a.entry_rows(entry_ids)
            return a.epilog(a.attend(q, kv, positions, start, n_valid, entry_rows, cache), cos, sin)

        stages = dict(project=project, queries=a.queries, token_kv=a.token_kv, finish=finish)
        if a.ratio:
            stages.update(compress_main=compress_main)
        # the selection as scores, then top-k (wq_b between them), where the layer's kernels table splits it: decided
        # here, with the stages (a layer given another table wants a new StreamedDecode)
        self.split_selection = a.indexer is not None and a.indexer.splits
        if a.indexer is not None:
            stages.update(compress_index=compress_index, index_weights=a.indexer.weights,
                          index_project=a.indexer.project_queries, index_rotate=a.indexer.rotate_queries)
            stages.update(dict(index_scores=index_scores, index_select=a.indexer.select) if self.split_selection
                          else dict(pick=pick))
        if compile:
            from ascend.backends.cuda import compile_decode
            stages = {name: compile_decode(fn, **options) for name, fn in stages.items()}
        self.stages = stages
        self._draw_sides()

    def _draw_sides(self, avoid=None) -> None:
        """Side streams from the device, distinct and none of them `avoid` (the step's main stream). CUDA hands out
        streams from a pool (torch: 32 per priority, round robin) that torch.cuda.graph's capture stream also comes
        from, so a side stream drawn later can be the very stream a step is captured on, and its branch then runs
        in line on the main path. On an H200 (docs/performance.md) two StreamedDecodes of twenty made in one process
        drew it; before this check such a one read up to 18 us per token slower than the others with the same
        compiled stages (CSA batch 8 at 128K 188.2 against 170.2-170.5: the benchmark tables' "slow second
        compile"). A pool too small to give them all is an error, not a loop without end."""
        a = self.layer
        wanted = 1 + bool(a.ratio) + 2 * (a.indexer is not None)
        sides = []
        for _ in range(SIDE_STREAM_DRAWS):
            s = self.device.stream()
            # `==` only: a torch stream's `!=` against None is False, so `s != avoid` refused every stream
            if not ((avoid is not None and s == avoid) or any(s == t for t in sides)):
                sides.append(s)
            if len(sides) == wanted:
                break
        else:
            raise RuntimeError(f"StreamedDecode: {SIDE_STREAM_DRAWS} streams from {self.device} gave fewer than "
                               f"{wanted} distinct side streams apart from the step's own")
        self.sides = sides
        self.kv_side, rest = sides[0], sides[1:]
        self.compress_side = rest.pop(0) if a.ratio else None
        self.index_keys_side, self.index_side = rest if a.indexer is not None else (None, None)

    def __call__(self, x: torch.Tensor, start: torch.Tensor, cache: LayerCache,
                 n_valid: torch.Tensor | None = None) -> torch.Tensor:
        if x.size(1) != 1:
            raise ValueError(f"StreamedDecode runs decode steps (one token per sequence), got chunks of {x.size(1)}")
        dev, a, f = self.device, self.layer, self.stages
        main = dev.current_stream()
        if any(s == main for s in self.sides):
            self._draw_sides(avoid=main)
        for s in self.sides:
            s.wait_stream(main)
        entry_ids = None
        if a.ratio:
            with dev.use_stream(self.compress_side):
                f["compress_main"](x, start, n_valid, cache)
        if a.indexer is not None:
            with dev.use_stream(self.index_keys_side):
                f["compress_index"](x, start, n_valid, cache)
            with dev.use_stream(self.index_side):
                weights = f["index_weights"](x)
        qr, wkv, cos, sin = f["project"](x, start)
        self.kv_side.wait_stream(main)
        with dev.use_stream(self.kv_side):
            kv = f["token_kv"](wkv, cos, sin)
        if a.indexer is not None:           # wq_b waits for the scores or the index projection (module docstring)
            self.index_side.wait_stream(main)
            with dev.use_stream(self.index_side):
                index_raw = f["index_project"](qr)
                if not self.split_selection:
                    main.wait_stream(self.index_side)
                index_q = f["index_rotate"](index_raw, cos, sin)
            self.index_keys_side.wait_stream(self.index_side)
            with dev.use_stream(self.index_keys_side):
                if self.split_selection:
                    scores = f["index_scores"](index_q, weights, x, start, cache)
                    main.wait_stream(self.index_keys_side)
                    entry_ids = f["index_select"](scores)
                else:
                    entry_ids = f["pick"](index_q, weights, x, start, cache)
        q = f["queries"](qr, cos, sin)
        for s in self.sides:
            main.wait_stream(s)
        # every tensor a branch was handed or made (qr, wkv, cos, sin, kv, weights, index_raw, index_q, scores,
        # entry_ids) is held to here, past the joins: no block of theirs is freed while another stream may still read
        # it
        return f["finish"](q, kv, cos, sin, x, start, n_valid, entry_ids, cache)

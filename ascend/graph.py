"""Decode graph capture: one captured graph per batch-size bucket, live batches padded up to a bucket.

A decode step is dozens of small launches per layer; replaying a captured graph (CUDA graph, or ACL
graph on Ascend via `torch.npu.NPUGraph`) removes the launch gaps. A graph only replays the shapes it
was captured with, so the runner captures a fixed set of batch sizes (`buckets`) and pads each live
batch to the smallest bucket that holds it (ascend-npu.md §3). On CPU the Device layer's graph is an
eager re-run, so the same runner logic is testable without an accelerator.

What the step must allow:
- every tensor argument is batch-first; the runner owns a static copy per bucket and copies the live
  rows in (and the padding rows from the values `make_inputs` gave) before each replay;
- it runs `warmup + 1` times on the padding inputs while capturing, and the padding rows run on every
  replay: any state it writes (KV caches) must tolerate that, e.g. by writing rows >= the live batch
  that the next prefill overwrites anyway;
- no host syncs (.item(), data-dependent shapes) inside, or capture fails.

`batch_rows(cache, n)` gives the step of bucket n a view of the first n sequences of a preallocated
`model.cache.KVCache` / `LayerCache`, so one cache serves every bucket.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_map

from ascend.device import Device, Graph
from ascend.errors import AscendDeployError

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


class GraphError(AscendDeployError):
    """A batch the captured graphs cannot serve, or a bad bucket list."""


def batch_rows(cache: Any, n: int) -> Any:
    """A shallow copy of a `KVCache` or `LayerCache` whose tensors are views of its first `n` batch rows
    (writes through the view land in `cache`)."""
    view = copy.copy(cache)
    if hasattr(cache, "layers"):                       # KVCache
        view.layers = [batch_rows(layer, n) for layer in cache.layers]
        view.lengths = cache.lengths[:n]
        view.batch = n
        return view
    for name in ("kv", "index_kv"):
        if getattr(cache, name) is not None:
            setattr(view, name, getattr(cache, name)[:n])
    for name in ("compressor", "index_compressor"):
        state = getattr(cache, name)
        if state is not None:
            setattr(view, name, type(state)(state.kv[:n], state.score[:n]))
    return view


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= batch."""
    for b in sorted(buckets):
        if b >= batch:
            return b
    raise GraphError(f"decode batch {batch} exceeds the largest captured bucket {max(buckets)} "
                     f"(capture more batch sizes via `buckets`)")


@dataclass
class _Captured:
    graph: Graph
    inputs: tuple[torch.Tensor, ...]   # static buffers the graph reads
    padding: tuple[torch.Tensor, ...]  # what padded rows hold
    outputs: Any                       # static tensors the graph writes


class DecodeGraphRunner:
    """`runner(*inputs)` == `step(*inputs)` for any batch up to max(buckets), replayed from captured graphs.

    step: the decode function (tensors in, a tensor or a pytree of batch-first tensors out).
    make_inputs(bucket): the static input tensors for one bucket; their values are the padding.
    """

    def __init__(self, step: Callable[..., Any], make_inputs: Callable[[int], Sequence[torch.Tensor]],
                 device: Device, buckets: Sequence[int] = DEFAULT_BUCKETS, warmup: int = 2):
        if not buckets or any(b < 1 for b in buckets) or len(set(buckets)) != len(buckets):
            raise GraphError(f"graph buckets must be distinct positive batch sizes, got {list(buckets)}")
        self.step, self.make_inputs, self.device = step, make_inputs, device
        self.buckets = tuple(sorted(buckets))
        self.warmup = warmup
        self._captured: dict[int, _Captured] = {}

    def capture(self) -> DecodeGraphRunner:
        """Capture every bucket into one shared memory pool (`Device.graph_pool()`), largest first so the
        pool is sized once; safe because buckets never replay concurrently and `__call__` copies outputs out."""
        pool = self.device.graph_pool()
        for bucket in reversed(self.buckets):
            inputs = tuple(self.make_inputs(bucket))
            if any(t.shape[0] != bucket for t in inputs):
                raise GraphError(f"make_inputs({bucket}) must return tensors with batch dim {bucket}, "
                                 f"got shapes {[tuple(t.shape) for t in inputs]}")
            padding = tuple(t.clone() for t in inputs)
            graph = self.device.graph()
            outputs = graph.capture(self.step, *inputs, warmup=self.warmup, pool=pool)
            self._captured[bucket] = _Captured(graph, inputs, padding, outputs)
        return self

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._captured))

    def __call__(self, *inputs: torch.Tensor, bucket: int | None = None) -> Any:
        """Replay the graph of `bucket` (default: the smallest that holds the batch; ranks whose graphs exchange
        tokens must all replay the same one)."""
        n = inputs[0].shape[0]
        bucket = bucket or bucket_for(n, self.buckets)
        if bucket < n:
            raise GraphError(f"a batch of {n} does not fit the bucket {bucket}")
        c = self._captured.get(bucket)
        if c is None:
            raise GraphError(f"no graph captured for a batch of {bucket} (captured: {list(self.captured)})")
        if len(inputs) != len(c.inputs):
            raise GraphError(f"decode step takes {len(c.inputs)} tensors, got {len(inputs)}")
        for static, pad, x in zip(c.inputs, c.padding, inputs):
            static[:n].copy_(x)
            static[n:].copy_(pad[n:])
        c.graph.replay()
        # the static outputs live in the shared pool, overwritten by the next replay: hand out copies
        return tree_map(lambda o: o[:n].clone() if isinstance(o, torch.Tensor) else o, c.outputs)

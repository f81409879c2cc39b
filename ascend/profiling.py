"""Where a step's device time goes: its kernels grouped by name, from torch.profiler, and what one stage costs
inside the step, from the step timed again with that stage replaced by a stand-in that does no work.

The benchmarks (`scripts/bench_launch.py --profile`, `scripts/bench_attention.py --profile`) print the kernels next
to their timings. Kernels replayed from a captured CUDA graph are traced too (CUPTI reports graph kernels), so a
captured decode step can be profiled as it runs in production. A kernel's span there is not its cost: launched with
programmatic dependent launch it starts while the kernel before it runs, and a kernel can run slower inside a step
than alone (on the H200 the indexer's top-k took ~13 us alone and ~30 us of the compiled CSA step,
docs/performance.md). `STAND_INS` (`scripts/bench_attention.py --stub`) measure what a whole stage costs in the
step (for the indexer: its scores and selection together).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["replay_us", "timed_decode", "kernel_table", "format_kernel_table", "short_error", "STAND_INS",
           "with_stand_in"]


def replay_us(device: Any, fn: Callable[[], Any], reps: int) -> float:
    """Microseconds per call of `fn` on an `ascend.device.Device`: captured once, then back-to-back replays (about
    20 ms of them, at most 200 unless `reps` asks for more) between two events, median of 5 such runs (CPU: eager
    re-runs)."""
    graph = device.graph()
    graph.capture(fn)
    t0 = time.perf_counter()
    graph.replay()
    device.synchronize()
    n = max(reps, min(200, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    runs = []
    for _ in range(5):
        start, end = device.event(), device.event()
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) * 1e3 / n)
    return statistics.median(runs)


def timed_decode(fn: Callable[[Any, Any], Any], tokens: Any, active: Any, steps: int, device: Any,
                 argmax: Callable[[Any], Any]) -> float:
    """Seconds for `steps` greedy decode steps of fn(tokens, active) -> logits (each step feeds its argmax to the
    next, picked by `argmax`: the model's `kernels.argmax`, as its greedy sampler picks), the device synchronised
    around them."""
    device.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = argmax(fn(tokens, active))
    device.synchronize()
    return time.perf_counter() - t0


def short_error(e: BaseException, width: int) -> str:
    """`Type: first line of the message` cut to `width` characters, for a benchmark row that could not be measured."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:width] if text else ''}"


def kernel_table(fn: Callable[[], Any], steps: int, top: int = 12) -> dict:
    """Run `fn()` `steps` times under the profiler; per step: kernel launches, kernel microseconds, and the `top`
    kernel names by time with their calls and microseconds."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, tuple[int, float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            n, us = kernels.get(e.name, (0, 0.0))
            kernels[e.name] = (n + 1, us + e.device_time)
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    return {"launches_per_step": sum(n for n, _ in kernels.values()) / steps,
            "kernel_us_per_step": sum(us for _, us in kernels.values()) / steps,
            "top": [{"kernel": name[:90], "calls_per_step": n / steps, "us_per_step": us / steps}
                    for name, (n, us) in rows[:top]]}


def format_kernel_table(table: dict, title: str) -> str:
    """`kernel_table`'s result as lines: a title with the totals, then one line per kernel."""
    lines = [f"kernels of one {title}: {table['launches_per_step']:.0f} launches, "
             f"{table['kernel_us_per_step']:.0f} us of kernels"]
    lines += [f"  {k['us_per_step']:>9.1f} us {k['calls_per_step']:>6.1f}x  {k['kernel']}" for k in table["top"]]
    return "\n".join(lines)


# Stand-ins for `model.kernels.Kernels` stages: the stage's output shape and dtype from one small kernel. Custom
# operators, so that a compiled step keeps them as opaque nodes that still take the stage's inputs (what produces
# those inputs keeps running, as in the real step) and cannot be folded away.
@torch.library.custom_op("ascend_profiling::no_selection", mutates_args=())
def _no_selection(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, n_visible: torch.Tensor,
                  topk: int) -> torch.Tensor:
    """`indexer_topk` without scores or selection: the first `topk` visible entries, -1 after them."""
    t = torch.arange(topk, device=q.device, dtype=torch.int32)
    return torch.where(t < n_visible.unsqueeze(-1), t, -1)


@_no_selection.register_fake
def _(q, k, weights, n_visible, topk):
    return q.new_empty(*n_visible.shape, topk, dtype=torch.int32)


@torch.library.custom_op("ascend_profiling::no_attention", mutates_args=())
def _no_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """`sparse_attn` without attention: zeros of q's shape."""
    return q.new_zeros(q.shape)


@_no_attention.register_fake
def _(q, kv, indices, sink, scale):
    return q.new_empty(q.shape)


STAND_INS: dict[str, Callable[..., Any]] = {
    "indexer_topk": lambda q, k, weights, n_visible, topk, group=None: _no_selection(q, k, weights, n_visible, topk),
    "sparse_attn": _no_attention,
}
"""Kernels field -> its stand-in (same signature)."""


def with_stand_in(kernels, stage: str, fn: Callable[..., Any] | None = None):
    """`kernels` (a `model.kernels.Kernels`) with `stage` replaced by `fn`, default its stand-in. Replacing
    `indexer_topk` also clears the table's split of it (`Kernels.indexer_scores`), which a decode schedule would
    otherwise run in its place; a `StreamedDecode` of such a table then orders wq_b after the index projection, as
    for any unsplit selection, so a stage cost measured through it includes that change of schedule
    (`scripts/bench_attention.py` stubs only the one-graph steps)."""
    split = {"indexer_scores": None} if stage == "indexer_topk" else {}
    return dataclasses.replace(kernels, **{stage: fn or STAND_INS[stage]}, **split)

"""Pictures of a plan (matplotlib, Agg backend: no display needed): memory per rank as stacked bars,
expert placement as a heat map of load per (MoE layer, EP rank) before and after placement."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ascend.planner.memory import COMPONENTS
from ascend.planner.errors import PlanError
from ascend.planner.plan import Plan

__all__ = ["plot_memory", "plot_placement", "placement_loads"]

_COLORS = {"attention": "#4C72B0", "routed_experts": "#DD8452", "shared_expert": "#C44E52",
           "embed_head": "#8172B3", "other": "#937860", "kv_cache": "#55A868", "workspace": "#8C8C8C"}


def plot_memory(plan: Plan, path: str | Path) -> None:
    """One bar per run of identical ranks, stacked by component, with the device capacity as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    if plan.world_size <= 16:       # one bar per rank; larger worlds: one bar per run of identical ranks
        bars = [(f"{i}", r["bytes"]) for r in plan.memory for i in range(r["ranks"][0], r["ranks"][1] + 1)]
    else:
        bars = [(f"{a}" if a == b else f"{a}-{b}", r["bytes"]) for r in plan.memory for a, b in [r["ranks"]]]
    labels = [b[0] for b in bars]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(labels) + 4.5), 5.0))
    bottom = [0.0] * len(labels)
    for c in COMPONENTS:
        values = [b[1][c] / gib for b in bars]
        ax.bar(labels, values, bottom=bottom, color=_COLORS[c], label=c.replace("_", " "), width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        if len(labels) <= 4 or x in (0, len(labels) - 1):
            ax.text(x, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
    if plan.capacity_bytes:
        ax.axhline(plan.capacity_bytes / gib, color="black", linestyle="--", linewidth=1)
        ax.text(-0.45, plan.capacity_bytes / gib, f"capacity {plan.capacity_bytes / gib:.0f} GiB",
                va="bottom", ha="left", fontsize=8)
    st = plan.settings
    ax.set_title(f"{plan.model} on {plan.world_size} x {plan.hardware or 'devices'}: dp{plan.dp} tp{plan.tp} "
                 f"ep{plan.ep} (+{plan.redundant} redundant experts)\nweights {st.get('weights')}, context "
                 f"{st.get('context')}, batch {st.get('batch')}, KV {st.get('kv_layout')}", fontsize=9, loc="left")
    ax.set_ylabel("GiB per rank")
    ax.set_xlabel("rank")
    top = max(bottom + [plan.capacity_bytes / gib if plan.capacity_bytes else 0])
    ax.set_ylim(0, top * 1.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")    # a PNG at exactly `path`, whatever its suffix
    plt.close(fig)


def placement_loads(plan: Plan) -> tuple[np.ndarray, np.ndarray, str]:
    """(before, after, what) rank loads [n_moe_layers, ep] divided by each layer's mean rank load.

    `before` is the contiguous load-blind split over the same slots, `after` the plan's placement. Uses the
    loads the planner recorded (`balance.rank_load`); older plans hold none, so every expert then counts
    as one unit of load split over its replicas.
    """
    from ascend.planner import placement as pl

    stored = plan.balance.get("rank_load")
    if isinstance(stored, dict) and "before" in stored and "after" in stored:
        before, after = np.asarray(stored["before"], float), np.asarray(stored["after"], float)
        what = f"{plan.balance.get('load', 'given')} load"
    else:
        load = np.ones((plan.n_moe_layers, plan.n_routed_experts))
        contiguous = pl.contiguous_placement(plan.n_moe_layers, plan.n_routed_experts, plan.n_physical_experts)
        before, after = pl.rank_loads(load, contiguous, plan.ep), pl.rank_loads(load, plan.phy2log, plan.ep)
        what = "plan stores no load: every expert counts 1"
    shape = (plan.n_moe_layers, plan.ep)
    if before.shape != shape or after.shape != shape:
        raise PlanError(f"plan: balance.rank_load has shape {list(before.shape)} / {list(after.shape)}, "
                        f"expected {list(shape)}")
    norm = lambda x: x / np.maximum(x.mean(1, keepdims=True), 1e-300)      # noqa: E731
    return norm(before), norm(after), what


def _ticks(n: int, most: int) -> list[int]:
    """At most `most` evenly spaced tick positions in 0..n-1, always including the first."""
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def plot_placement(plan: Plan, path: str | Path) -> None:
    """Heat map of each EP rank's share of each MoE layer's load, before (contiguous) and after placement.

    1.0 is the layer's mean rank load (perfect balance); both panels share one colour scale centred there,
    so red cells are the ranks that set the layer's step time.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    before, after, what = placement_loads(plan)
    L, ep = before.shape
    top = max(1.05, float(max(before.max(), after.max())))
    low = min(0.95, float(min(before.min(), after.min())))
    norm = TwoSlopeNorm(vmin=low, vcenter=1.0, vmax=top)
    width = min(16.0, max(7.5, 2 * 0.32 * ep + 3.0))
    height = min(14.0, max(3.8, 0.2 * L + 1.8))
    fig, axes = plt.subplots(1, 2, figsize=(width, height), sharey=True, constrained_layout=True)
    layer_names = [str(i) if i < plan.n_layers else f"mtp{i - plan.n_layers}" for i in range(L)]
    for ax, loads, name in ((axes[0], before, "before: contiguous split"), (axes[1], after, "after: this plan")):
        im = ax.imshow(loads, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        bal = loads.mean(1) / loads.max(1)
        ax.set_title(f"{name}\nbalancedness mean {bal.mean():.3f}, worst layer {bal.min():.3f}\n"
                     f"busiest rank {loads.max():.2f} x its layer's mean", fontsize=9)
        if L * ep <= 96:                               # few cells: print the values too
            for (i, r), v in np.ndenumerate(loads):
                ax.text(r, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(norm(v) - 0.5) > 0.3 else "black")
        xt = _ticks(ep, 16)
        ax.set_xticks(xt, [str(r) for r in xt], fontsize=7)
        ax.set_xlabel("EP rank")
        if ep <= 64:                                   # thin lines between ranks while they are visible
            ax.set_xticks(np.arange(-0.5, ep, 1), minor=True)
            ax.tick_params(axis="x", which="minor", length=0)
            ax.grid(axis="x", which="minor", color="white", linewidth=0.4)
    yt = _ticks(L, 24)
    axes[0].set_yticks(yt, [layer_names[i] for i in yt], fontsize=7)
    axes[0].set_ylabel("MoE layer")
    bar = fig.colorbar(im, ax=axes, shrink=0.9, pad=0.02)
    bar.set_label("rank load / mean rank load (1.0 = balanced)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{plan.model}: expert load per EP rank, ep{plan.ep}, {plan.n_routed_experts} experts "
                 f"+ {plan.redundant} redundant ({plan.slots_per_rank} slots per rank); {what}", fontsize=9)
    fig.savefig(path, dpi=110, format="png")    # a PNG at exactly `path`, whatever its suffix
    plt.close(fig)

"""Stacked bar chart of a plan's memory per rank (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from ascend.planner.memory import COMPONENTS
from ascend.planner.plan import Plan

__all__ = ["plot_memory"]

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
    fig.savefig(path, dpi=110)
    plt.close(fig)

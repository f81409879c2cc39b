"""Benchmark the expert placement against DeepSeek's greedy EPLB, and time a SuperPoD-sized plan.

For V4-Flash (256 experts, 43 MoE layers) and V4-Pro (384, 61) on synthetic lognormal expert loads
(sigma 0.5 / 1 / 2), in four EP settings, it prints per-layer balancedness (mean rank load / max rank
load) of our placement, of the greedy EPLB baseline run on the same input, and the lower bound for the
replica budget; then the time to plan 8,192 devices x 61 layers x 384 experts, and the peak memory.
Times are CPU seconds of this process (time.process_time), so a busy machine does not inflate them.

    python scripts/bench_plan.py            # full table (a few minutes on one core)
    python scripts/bench_plan.py --quick    # one seed, fewer settings
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")          # one core, as the target says

import numpy as np  # noqa: E402

from ascend.argtypes import positive  # noqa: E402
from ascend.hardware import get_hardware  # noqa: E402
from ascend.planner import placement as pl  # noqa: E402
from ascend.planner.layout import plan_deployment  # noqa: E402
from ascend.planner.memory import MemorySettings  # noqa: E402
from model.config import ModelConfig  # noqa: E402

PRESETS = {"V4-Flash": ModelConfig.preset("flash"), "V4-Pro": ModelConfig.preset("pro")}
MODELS = {name: (c.n_routed_experts, c.n_layers) for name, c in PRESETS.items()}   # MTP layers left out
# (label, ep, redundant asked for, ranks per node, expert groups for EPLB)
SETTINGS = [("EP32+32", 32, 32, 16, 1), ("EP64, groups = nodes", 64, 0, 8, 8),
            ("EP144+32", 144, 32, 16, 1), ("EP256+256", 256, 256, 16, 1)]


def fill_redundant(n_experts: int, ep: int, redundant: int) -> int:
    """Smallest redundant count >= the one asked for that gives every EP rank the same number of slots."""
    return redundant + (-(n_experts + redundant)) % ep


def bound_gap(peak: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """How far each layer's peak rank load is above the lower bound (0.02 = 2%); 0 for a layer with no load."""
    return pl.mean_over_peak(peak, bound) - 1       # peak / bound, 1 where the bound (and so the peak) is 0


def run_case(E: int, L: int, ep: int, redundant: int, rpn: int, groups: int, sigma: float, seed: int) -> dict:
    load = pl.synthetic_load(L, E, sigma, seed)
    P = E + redundant
    t0 = time.process_time()
    ours = pl.place(load, ep, P // ep, ranks_per_node=rpn, n_groups=groups)
    t_ours = time.process_time() - t0
    t0 = time.process_time()
    base = pl.eplb_baseline(load, P, ep, n_groups=groups, n_nodes=ep // rpn)
    t_base = time.process_time() - t0
    loads = pl.rank_loads(load, ours, ep)           # once, for both our balancedness and our gap to the bound
    peak, bound = loads.max(1), pl.lower_bound(load, P, ep)
    b_ours, b_base = pl.mean_over_peak(loads.mean(1), peak), pl.balancedness(load, base, ep)
    return {"ours": b_ours, "eplb": b_base, "bound": pl.mean_over_peak(load.sum(1) / ep, bound),
            "gap": bound_gap(peak, bound), "worse": int((b_ours < b_base - 1e-12).sum()), "t_ours": t_ours,
            "t_base": t_base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, sigma 1 only, first two settings")
    ap.add_argument("--seeds", type=positive, default=3)
    args = ap.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    sigmas = (1.0,) if args.quick else (0.5, 1.0, 2.0)
    settings = SETTINGS[:2] if args.quick else SETTINGS

    print("| model | setting | sigma | ours mean | EPLB mean | ours / EPLB | bound mean | ours worst | EPLB worst "
          "| layers within 2% of bound | layers worse than EPLB | ours CPU s | EPLB CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    all_ratio, all_worse = [], 0
    for model, (E, L) in MODELS.items():
        for label, ep, asked, rpn, groups in settings:
            redundant = fill_redundant(E, ep, asked)
            name = label if redundant == asked else f"{label} (+{redundant} to fill {ep} ranks)"
            for sigma in sigmas:
                runs = [run_case(E, L, ep, redundant, rpn, groups, sigma, s) for s in seeds]
                cat = {k: np.concatenate([r[k] for r in runs]) for k in ("ours", "eplb", "bound", "gap")}
                worse = sum(r["worse"] for r in runs)
                all_worse += worse
                ratio = cat["ours"].mean() / cat["eplb"].mean()
                all_ratio.append(ratio)
                print(f"| {model} | {name} | {sigma} | {cat['ours'].mean():.4f} | {cat['eplb'].mean():.4f} | "
                      f"{ratio:.4f} | {cat['bound'].mean():.4f} | {cat['ours'].min():.4f} | {cat['eplb'].min():.4f} | "
                      f"{(cat['gap'] <= 0.02).mean():.0%} | {worse} | "
                      f"{np.mean([r['t_ours'] for r in runs]):.2f} | {np.mean([r['t_base'] for r in runs]):.2f} |")
    print(f"\nlayers where ours is worse than EPLB: {all_worse}; mean ours/EPLB balancedness ratio "
          f"{np.mean(all_ratio):.4f} (min {np.min(all_ratio):.4f}, max {np.max(all_ratio):.4f})")

    # --- a SuperPoD-sized plan: layout search + placement for V4-Pro on 8,192 Ascend 950DT
    pro = PRESETS["V4-Pro"]
    L, E = pro.n_layers + pro.n_mtp_layers, pro.n_routed_experts
    hw = get_hardware("atlas-950-superpod")
    load = pl.synthetic_load(L, E, 1.0, seed=0)
    settings_ = MemorySettings(context=131072, batch=8192 * 16)
    t0 = time.process_time()
    plan = plan_deployment(pro, hw, 8192, settings_, expert_load=load, model="pro")
    t_plan = time.process_time() - t0
    print(f"\nplan V4-Pro on 8,192 x {hw.name} (search + placement of {plan.n_moe_layers} MoE layers x "
          f"{E} experts): {t_plan:.2f} CPU s -> dp{plan.dp}/tp{plan.tp}/ep{plan.ep} "
          f"+{plan.redundant} redundant, balancedness {np.mean(plan.balance['after']):.4f} "
          f"(EPLB {np.mean(plan.balance['eplb']):.4f})")
    for ep, redundant in ((768, 768 - E), (8192, 8192 - E)):
        t0 = time.process_time()
        phy2log = pl.place(load, ep, (E + redundant) // ep, ranks_per_node=64)
        t_place = time.process_time() - t0
        t0 = time.process_time()
        base = pl.eplb_baseline(load, E + redundant, ep)
        t_base = time.process_time() - t0
        print(f"placement alone, EP{ep} (+{redundant} redundant), {L} layers x {E} experts: {t_place:.2f} CPU s "
              f"(EPLB greedy {t_base:.2f} s); balancedness {pl.balancedness(load, phy2log, ep).mean():.4f} vs "
              f"{pl.balancedness(load, base, ep).mean():.4f}")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

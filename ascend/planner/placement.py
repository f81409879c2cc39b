"""Expert placement with redundancy (EPLB): which logical expert each physical slot holds, per MoE layer.

Inputs are per-layer expert loads `load[L, E]` (tokens routed to each logical expert). A placement is
`phy2log[L, P]` with P = n_ranks * slots_per_rank physical slots; rank r holds slots [r*S, (r+1)*S).
Tokens of an expert are split evenly over its replicas, so a rank's load is
sum over its slots of load[e] / replicas[e]. Quality per layer is the balancedness
mean rank load / max rank load (1.0 is perfect).

`place` (ours): replica counts by water-filling (and coarser variants), packing by sorted rounds (the
heaviest remaining replicas onto the lightest ranks), then pairwise swaps that lower the busiest rank,
flat and node-first; it also runs `eplb_baseline` (our implementation of DeepSeek's published greedy
EPLB) and keeps, per layer, whichever placement has the smaller maximum rank load, so it is never
worse. Replicas of one expert are kept on different ranks where that costs nothing (or always, with
`distinct`). All steps are vectorised over layers with numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ascend.errors import parse_json
from ascend.planner.errors import PlanError

__all__ = [
    "place", "eplb_baseline", "replica_counts", "rank_loads", "mean_over_peak", "balancedness", "lower_bound",
    "bound_balancedness", "logcnt_of", "log2phy_of", "duplicate_slots", "separate_replicas", "contiguous_placement",
    "synthetic_load", "read_expert_load", "check_load",
]

COUNT_FACTORS = (1.0, 1.05, 1.15, 1.3, 1.6)    # replica-count variants tried by `place`


# ----------------------------------------------------------------------------------- bookkeeping
def logcnt_of(phy2log: np.ndarray, n_experts: int) -> np.ndarray:
    """Replicas per logical expert, [L, E]."""
    L = phy2log.shape[0]
    cnt = np.zeros((L, n_experts), dtype=np.int64)
    np.add.at(cnt, (np.repeat(np.arange(L), phy2log.shape[1]), phy2log.ravel()), 1)
    return cnt


def log2phy_of(phy2log: np.ndarray, n_experts: int) -> np.ndarray:
    """Physical slots of each logical expert in increasing slot order, [L, E, max replicas], -1 padded."""
    L, P = phy2log.shape
    cnt = logcnt_of(phy2log, n_experts)
    out = np.full((L, n_experts, max(1, int(cnt.max()))), -1, dtype=np.int64)
    order = np.argsort(phy2log, axis=1, kind="stable")            # slots grouped by expert, in slot order
    experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.cumsum(cnt, axis=1) - cnt                          # where each expert's group starts
    replica = np.arange(P)[None, :] - np.take_along_axis(first, experts, axis=1)
    out[np.repeat(np.arange(L), P), experts.ravel(), replica.ravel()] = order.ravel()
    return out


def rank_loads(load: np.ndarray, phy2log: np.ndarray, n_ranks: int) -> np.ndarray:
    """Load of every rank, [L, n_ranks], with an expert's tokens split evenly over its replicas."""
    per_slot = np.take_along_axis(load / logcnt_of(phy2log, load.shape[1]), phy2log, axis=1)
    return per_slot.reshape(load.shape[0], n_ranks, -1).sum(-1)


def mean_over_peak(mean: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """mean / peak per layer, 1.0 where the peak is 0 (a layer with no load is perfectly balanced)."""
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1), 1.0)


def balancedness(load: np.ndarray, phy2log: np.ndarray, n_ranks: int) -> np.ndarray:
    """Mean rank load / max rank load per layer (1.0 for a layer with no load)."""
    loads = rank_loads(load, phy2log, n_ranks)
    return mean_over_peak(loads.mean(1), loads.max(1))


def lower_bound(load: np.ndarray, n_slots: int, n_ranks: int) -> np.ndarray:
    """Smallest possible max rank load per layer: max(mean rank load, best possible max replica load)."""
    counts = replica_counts(load, n_slots)
    return np.maximum(load.sum(1) / n_ranks, (load / counts).max(1))


def bound_balancedness(load: np.ndarray, n_slots: int, n_ranks: int) -> np.ndarray:
    """The best balancedness any placement of `n_slots` replicas could reach: mean rank load / `lower_bound` per
    layer (1.0 for a layer with no load, as in `balancedness`)."""
    return mean_over_peak(load.sum(1) / n_ranks, lower_bound(load, n_slots, n_ranks))


# ----------------------------------------------------------------------------------- replication
def replica_counts(load: np.ndarray, n_slots: int, cap: int | None = None) -> np.ndarray:
    """Replicas per expert, [L, E], summing to n_slots, minimising the largest load / replicas
    (with at most `cap` replicas each: one per rank keeps replicas on distinct ranks possible).

    Water-filling: c_e = clip(ceil(load_e / t), 1, cap) for the smallest threshold t whose total fits
    (bisection on t, all layers at once); slots left over go one at a time to the largest load / c.
    """
    L, E = load.shape
    cap = n_slots if cap is None else cap
    if n_slots < E or cap * E < n_slots:
        raise PlanError(f"{n_slots} physical expert slots cannot hold {E} experts with 1..{cap} replicas each")
    w = load.astype(np.float64)
    lo = np.zeros(L)
    hi = np.maximum(w.max(1), 1e-300)                             # at t = max load every expert needs 1
    for _ in range(64):
        mid = (lo + hi) / 2
        need = np.clip(np.ceil(w / np.maximum(mid, 1e-300)[:, None]), 1, cap).sum(1)
        fits = need <= n_slots
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, mid)
    counts = np.clip(np.ceil(w / hi[:, None]), 1, cap).astype(np.int64)
    return _fill(w, counts, n_slots, cap)


def _fill(load: np.ndarray, counts: np.ndarray, n_slots: int, cap: int) -> np.ndarray:
    """Give the slots still free one at a time to the expert with the largest load / replicas (< cap)."""
    left = n_slots - counts.sum(1)
    rows = np.arange(load.shape[0])
    while (left > 0).any():                                       # at most E * cap rounds
        active = left > 0
        best = np.argmax(np.where(counts < cap, load / counts, -1.0), axis=1)
        counts[rows[active], best[active]] += 1
        left -= active
    return counts


def _coarser_counts(load: np.ndarray, n_slots: int, factor: float, cap: int | None = None) -> np.ndarray:
    """Fewer replicas for hot experts: c_e = clip(ceil(load_e / (factor * t*)), 1, cap), t* the optimal
    max replica load; the freed slots go to the hottest single-replica experts, then greedily.

    The optimum of max(load / replicas) can leave a few more big replicas than ranks, so two of them
    share a rank; slightly larger, fewer replicas often pack better. `place` tries several factors.
    """
    L, E = load.shape
    cap = n_slots if cap is None else cap
    best = (load / replica_counts(load, n_slots, cap)).max(1)
    counts = np.clip(np.ceil(load / np.maximum(best * factor, 1e-300)[:, None]), 1, cap).astype(np.int64)
    left = n_slots - counts.sum(1)
    single = np.where(counts == 1, load, -1.0)
    order = np.argsort(-single, axis=1, kind="stable")           # hottest single-replica experts first
    n_single = (counts == 1).sum(1) if cap > 1 else np.zeros(L, dtype=np.int64)
    take = np.arange(E)[None, :] < np.minimum(left, n_single)[:, None]
    np.put_along_axis(counts, order, np.take_along_axis(counts, order, 1) + take, 1)
    return _fill(load, counts, n_slots, cap)


def _items(load: np.ndarray, counts: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicas as items sorted by size (descending, replicas of one expert adjacent): (expert, size)."""
    L, E = load.shape
    experts = np.repeat(np.broadcast_to(np.arange(E), (L, E)).ravel(), counts.ravel()).reshape(L, n_slots)
    sizes = np.take_along_axis(load / counts, experts, axis=1)
    order = np.lexsort((experts, -sizes), axis=1)
    return np.take_along_axis(experts, order, 1), np.take_along_axis(sizes, order, 1)


# ----------------------------------------------------------------------------------- packing
def _pack_rounds(sizes: np.ndarray, n_bins: int) -> np.ndarray:
    """Items (sorted descending, [L, n_bins*k]) into n_bins bins of k each: bin of every item, [L, n].

    Round j takes the next n_bins items and gives the heaviest to the currently lightest bin.
    """
    L, n = sizes.shape
    bins = np.empty((L, n), dtype=np.int64)
    totals = np.zeros((L, n_bins))
    for j in range(n // n_bins):
        lightest = np.argsort(totals, axis=1, kind="stable")
        bins[:, j * n_bins:(j + 1) * n_bins] = lightest
        np.put_along_axis(totals, lightest, np.take_along_axis(totals, lightest, 1) + sizes[:, j * n_bins:(j + 1) * n_bins], 1)
    return bins


def _grid(experts: np.ndarray, sizes: np.ndarray, bins: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder items so bin b owns columns [b*k, (b+1)*k): (experts, sizes) as [L, n_bins, k]."""
    order = np.argsort(bins, axis=1, kind="stable")
    L = experts.shape[0]
    return (np.take_along_axis(experts, order, 1).reshape(L, n_bins, -1),
            np.take_along_axis(sizes, order, 1).reshape(L, n_bins, -1))


def _refine(experts: np.ndarray, sizes: np.ndarray, max_rounds: int, distinct: bool = False) -> None:
    """In place: swap one item of the busiest bin with one of a light bin while that lowers the peak.

    Per layer the best swap (smallest max of the two new bin totals) with one of the lightest bins is
    applied; a layer stops when its busiest bin has no improving swap. Only the lightest bins are tried
    so the [layers, k, bins, k] candidate array stays a few million entries. With `distinct` (ranks, not
    nodes) a swap may not bring an expert into a bin that already holds it.
    """
    L, B, k = sizes.shape
    if k == 1 or B == 1:                          # a swap cannot lower the peak
        return
    n_light = int(min(B, max(4, 4_000_000 // max(L * k * k, 1))))
    active = np.arange(L)
    for _ in range(max_rounds):
        if active.size == 0:
            return
        A = np.arange(active.size)
        s = sizes[active]                                         # [A, B, k]
        tot = s.sum(2)
        m = tot.argmax(1)
        peak = tot[A, m]
        light = np.argsort(tot, axis=1, kind="stable")[:, :n_light]                  # [A, n]
        s_l = np.take_along_axis(s, light[:, :, None], 1)                           # [A, n, k]
        d = s[A, m][:, :, None, None] - s_l[:, None, :, :]                          # [A, k, n, k]
        new_peak = np.maximum(peak[:, None, None, None] - d,
                              np.take_along_axis(tot, light, 1)[:, None, :, None] + d)
        new_peak[d <= 0] = np.inf
        if distinct:
            e = experts[active]
            e_m, e_l = e[A, m], np.take_along_axis(e, light[:, :, None], 1)             # [A, k], [A, n, k]
            into_light = (e_m[:, :, None, None] == e_l[:, None, :, :]).any(-1)       # [A, k, n]
            into_peak = (e_l[:, :, :, None] == e_m[:, None, None, :]).any(-1)        # [A, n, k]
            new_peak[into_light[:, :, :, None] | into_peak[:, None, :, :]] = np.inf
        flat = new_peak.reshape(active.size, -1)
        best = flat.argmin(1)
        ok = peak - flat[A, best] > 1e-12 * np.maximum(peak, 1e-300)
        if not ok.any():
            return
        a = active[ok]
        i, bl, j = np.unravel_index(best[ok], (k, n_light, k))
        b = light[ok, bl]
        mm = m[ok]
        for arr in (sizes, experts):
            held = arr[a, mm, i].copy()
            arr[a, mm, i] = arr[a, b, j]
            arr[a, b, j] = held
        active = a


def _pack(experts: np.ndarray, sizes: np.ndarray, n_ranks: int, ranks_per_node: int) -> np.ndarray:
    """Physical placement [L, P] of sorted items onto ranks, optionally node first."""
    L, P = experts.shape
    n_nodes = n_ranks // ranks_per_node
    if n_nodes <= 1 or ranks_per_node <= 1:
        e, s = _grid(experts, sizes, _pack_rounds(sizes, n_ranks), n_ranks)
        _refine(e, s, 4 * n_ranks + 32, distinct=True)
        return e.reshape(L, P)
    # node first: replicas of one expert fall in the same round, hence on different nodes
    e, s = _grid(experts, sizes, _pack_rounds(sizes, n_nodes), n_nodes)
    if P > n_ranks:                                               # one slot per rank: node totals do not matter
        _refine(e, s, 4 * n_nodes + 32)
    # then the dies of each node (node-major rows: layer l, node n -> row l*n_nodes + n)
    e, s = e.reshape(L * n_nodes, -1), s.reshape(L * n_nodes, -1)
    order = np.lexsort((e, -s), axis=1)
    e, s = np.take_along_axis(e, order, 1), np.take_along_axis(s, order, 1)
    e, s = _grid(e, s, _pack_rounds(s, ranks_per_node), ranks_per_node)
    e, s = e.reshape(L, n_ranks, -1), s.reshape(L, n_ranks, -1)
    _refine(e, s, 4 * n_ranks + 32, distinct=True)                # final swaps across all ranks
    return e.reshape(L, P)


def place(load: np.ndarray, n_ranks: int, slots_per_rank: int, ranks_per_node: int | None = None,
          n_groups: int = 1, distinct: bool = False) -> np.ndarray:
    """Best placement found, [L, n_ranks*slots_per_rank]: per layer the smallest peak rank load among
    our packings (flat and node-first, for each replica-count variant, stopping once every layer is
    within 0.1% of the lower bound) and the EPLB baseline (run with `n_groups`, nodes as given).

    Replicas of one expert then move to different ranks where that costs no balance; with `distinct`
    (vllm-ascend's static map needs it) they move even at some cost, and EPLB's placement only counts
    for layers where it gives no expert more replicas than ranks."""
    load = check_load(load)
    P = n_ranks * slots_per_rank
    rpn = ranks_per_node if ranks_per_node and n_ranks % ranks_per_node == 0 else n_ranks
    bound = lower_bound(load, P, n_ranks)
    candidates, tried = [], []
    for factor in COUNT_FACTORS:       # at most one replica of an expert per rank
        counts = replica_counts(load, P, n_ranks) if factor == 1 else _coarser_counts(load, P, factor, n_ranks)
        if any(np.array_equal(counts, t) for t in tried):
            continue
        tried.append(counts)
        experts, sizes = _items(load, counts, P)
        if rpn < n_ranks:                                         # node first: spreads replicas over nodes
            candidates.append(_pack(experts, sizes, n_ranks, rpn))
        candidates.append(_pack(experts, sizes, n_ranks, n_ranks))
        best_peak = np.min([rank_loads(load, c, n_ranks).max(1) for c in candidates], axis=0)
        if (best_peak <= bound * (1 + 1e-3)).all():              # every layer within 0.1% of optimal
            break
    candidates.append(eplb_baseline(load, P, n_ranks, n_groups=n_groups, n_nodes=n_ranks // rpn))
    peaks = np.stack([rank_loads(load, c, n_ranks).max(1) for c in candidates])      # [C, L]
    if distinct:
        peaks[-1, logcnt_of(candidates[-1], load.shape[1]).max(1) > n_ranks] = np.inf
    best = np.full(load.shape[0], len(candidates) - 1)
    for c in range(len(candidates) - 2, -1, -1):                 # earlier candidates win ties
        best = np.where(peaks[c] <= peaks[best, np.arange(load.shape[0])] * (1 + 1e-12), c, best)
    chosen = np.stack(candidates)[best, np.arange(load.shape[0])]
    separate_replicas(load, chosen, n_ranks, allow_rise=distinct)
    return chosen


def duplicate_slots(phy2log: np.ndarray, n_ranks: int) -> np.ndarray:
    """Per layer, how many slots repeat an expert already held by the same rank."""
    grid = np.sort(phy2log.reshape(phy2log.shape[0], n_ranks, -1), axis=2)
    return (grid[:, :, 1:] == grid[:, :, :-1]).sum((1, 2))


def separate_replicas(load: np.ndarray, phy2log: np.ndarray, n_ranks: int, allow_rise: bool = False) -> None:
    """In place: where a rank holds two replicas of one expert, swap one for a replica of another expert
    on a rank that holds neither, choosing the swap with the smallest new pair maximum; unless
    `allow_rise`, only swaps that keep the layer's peak rank load. (vllm-ascend's expert map needs
    distinct experts per device; a layer where an expert has more replicas than ranks keeps duplicates.)"""
    size = load / logcnt_of(phy2log, load.shape[1])
    for layer in np.flatnonzero(duplicate_slots(phy2log, n_ranks)):
        grid = phy2log[layer].reshape(n_ranks, -1)              # a view: swaps write through
        w = size[layer]
        loads = w[grid].sum(1)
        peak = loads.max()
        for r in range(n_ranks):
            for i in range(grid.shape[1]):
                e = grid[r, i]
                if (grid[r, :i] != e).all():
                    continue                                     # first copy on this rank
                y = w[grid]                                      # [ranks, slots]: candidates to swap in
                new_r = loads[r] - w[e] + y
                new_other = loads[:, None] - y + w[e]
                cost = np.maximum(new_r, new_other)
                cost[(grid == e).any(1)] = np.inf                # that rank already holds e
                cost[np.isin(grid, grid[r])] = np.inf            # rank r already holds that expert
                if not allow_rise:
                    cost[cost > peak * (1 + 1e-12)] = np.inf
                r2, j = np.unravel_index(np.argmin(cost), cost.shape)
                if not np.isfinite(cost[r2, j]):
                    continue
                loads[r], loads[r2] = new_r[r2, j], new_other[r2, j]
                grid[r, i], grid[r2, j] = grid[r2, j], e


# ----------------------------------------------------------------------------------- EPLB baseline
def _balanced_packing(weight: np.ndarray, n_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's greedy: items by decreasing weight, each to the lightest pack that still has room.
    Returns (pack index, position in pack), both [X, n]."""
    X, n = weight.shape
    per_pack = n // n_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n), (X, n)).copy(), np.zeros((X, n), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    pack = np.empty((X, n), dtype=np.int64)
    pos = np.empty((X, n), dtype=np.int64)
    totals = np.zeros((X, n_packs))
    filled = np.zeros((X, n_packs), dtype=np.int64)
    rows = np.arange(X)
    for j in range(n):
        item = order[:, j]
        p = np.where(filled < per_pack, totals, np.inf).argmin(1)   # first minimum, like Python's min
        pack[rows, item] = p
        pos[rows, item] = filled[rows, p]
        totals[rows, p] += weight[rows, item]
        filled[rows, p] += 1
    return pack, pos


def _replicate_greedy(weight: np.ndarray, n_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's replication: each extra replica goes to the expert with the largest load / replicas."""
    X, n_log = weight.shape
    phy2log = np.broadcast_to(np.arange(n_phy) % max(n_log, 1), (X, n_phy)).copy()
    rank = np.zeros((X, n_phy), dtype=np.int64)
    cnt = np.ones((X, n_log), dtype=np.int64)
    rows = np.arange(X)
    for i in range(n_log, n_phy):
        e = (weight / cnt).argmax(1)
        phy2log[:, i] = e
        rank[:, i] = cnt[rows, e]
        cnt[rows, e] += 1
    return phy2log, rank, cnt


def eplb_baseline(load: np.ndarray, n_slots: int, n_ranks: int, n_groups: int = 1, n_nodes: int = 1) -> np.ndarray:
    """DeepSeek's published EPLB (rebalance_experts), reimplemented: hierarchical when n_groups is a
    multiple of n_nodes (groups packed to nodes, replicas within nodes, then packed to ranks), else global.
    Returns phy2log [L, n_slots]."""
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    if n_groups % n_nodes != 0 or E % n_groups != 0 or n_ranks % n_nodes != 0 or n_slots % n_nodes != 0:
        n_groups, n_nodes = 1, 1
    group_size, groups_per_node = E // n_groups, n_groups // n_nodes
    per_rank = n_slots // n_ranks
    # 1. groups to nodes
    gpack, grank = _balanced_packing(load.reshape(L, n_groups, group_size).sum(-1), n_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = np.argsort(log2mlog, axis=1)
    # 2. replicas within each node
    w_mlog = np.take_along_axis(load, mlog2log, 1).reshape(L * n_nodes, E // n_nodes)
    phy2mlog, _, mlogcnt = _replicate_greedy(w_mlog, n_slots // n_nodes)
    # 3. replicas to the ranks of the node
    w_phy = np.take_along_axis(w_mlog / mlogcnt, phy2mlog, 1)
    pack, pos = _balanced_packing(w_phy, n_ranks // n_nodes)
    pphy2phy = np.argsort(pack * per_rank + pos, axis=1)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1).reshape(L, n_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(n_nodes) * (E // n_nodes))[None, :, None]).reshape(L, -1)
    return np.take_along_axis(mlog2log, pphy2mlog, 1)


def contiguous_placement(n_layers: int, n_experts: int, n_slots: int) -> np.ndarray:
    """The load-blind placement: slot p holds expert p mod E (experts in order, extras from expert 0)."""
    return np.broadcast_to(np.arange(n_slots) % n_experts, (n_layers, n_slots)).copy()


# ----------------------------------------------------------------------------------- load statistics
def synthetic_load(n_layers: int, n_experts: int, sigma: float = 1.0, seed: int = 0,
                   tokens: float = 1e6) -> np.ndarray:
    """Lognormal expert popularity (skew `sigma`), `tokens` routed per layer, [L, E]."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, sigma, size=(n_layers, n_experts))
    return w / w.sum(1, keepdims=True) * tokens


def check_load(load: np.ndarray, source: str = "expert load") -> np.ndarray:
    """`load` as a float64 [layers, experts] array, or a PlanError for a wrong shape, NaN or negative values."""
    arr = np.asarray(load)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise PlanError(f"{source}: expected a numeric [layers, experts] array, got shape {arr.shape} ({arr.dtype})")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise PlanError(f"{source}: contains NaN or infinite values; expected finite token counts >= 0")
    if (arr < 0).any():
        raise PlanError(f"{source}: contains negative values; expected token counts >= 0")
    return arr


def read_expert_load(path: str | Path, n_layers: int, n_experts: int, n_mtp_layers: int = 0) -> np.ndarray:
    """Load statistics from .npy (no pickles), .json (nested lists or {"load": ...}) or .csv.

    Accepts [n_layers, E] or [n_layers + n_mtp_layers, E]; MTP layers without statistics get the mean
    load of the main layers. Returns [n_layers + n_mtp_layers, E] float64.
    """
    path = Path(path)
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            data = parse_json(path.read_text())
            arr = np.asarray(data["load"] if isinstance(data, dict) else data, dtype=np.float64)
        elif path.suffix == ".csv":
            arr = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            raise PlanError(f"{path}: unknown expert-load format {path.suffix!r}; expected .npy, .json or .csv")
    except PlanError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"{path}: cannot read expert load ({type(e).__name__}: {e})") from None
    arr = check_load(arr, str(path))
    total = n_layers + n_mtp_layers
    if arr.shape[1] != n_experts or arr.shape[0] not in (n_layers, total):
        raise PlanError(f"{path}: expert load has shape {list(arr.shape)}; expected [{n_layers}, {n_experts}]"
                        + (f" or [{total}, {n_experts}] (with MTP layers)" if n_mtp_layers else ""))
    if arr.shape[0] < total:
        arr = np.concatenate([arr, np.repeat(arr.mean(0, keepdims=True), total - arr.shape[0], 0)])
    return arr

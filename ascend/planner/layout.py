"""Layout search: every valid (dp, tp, ep) for a device count, ranked by a stated cost model.

Attention runs data-parallel over dp groups of tp ranks (tp splits heads, o_groups, indexer heads and
the vocabulary); routed experts run expert-parallel over ep consecutive ranks (ep divides the world,
world / ep groups each hold every expert). Rules (V4 divisibility + fused-operator limits of the
hardware entry) are in `check_layout`; the cost model (docs/planner.md) in `evaluate`:

1. memory: the largest rank must fit in the device's memory;
2. communication per decoded token: TP all-reduces (attention output, indexer scores) and EP
   dispatch/combine bytes, each over the link it crosses (inside a node or across nodes);
3. decode-step time: per rank max(FLOPs / dense compute, bytes read / HBM bandwidth) + communication.

Candidates rank by (fits, communication per token to 2 significant digits, decode-step time).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ascend.planner.errors import PlanError
from ascend.planner.memory import (MemorySettings, expert_bytes, kv_bytes, layer_ratios, memory_per_rank,
                                   weight_formats)

__all__ = ["Candidate", "check_layout", "evaluate", "search", "divisors", "explain", "plan_deployment"]

GiB = 2**30


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending, found up to sqrt(n): a scan up to n made a plan for 100,000 nodes (1.6 M
    devices) take minutes (`check_layout` lists them in its messages)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def tp_problems(config: Any, world: int, tp: int) -> list[str]:
    """The rules tp breaks on its own, whatever ep: it must divide the devices and split the model's heads."""
    out = []
    if tp < 1 or world % tp:
        out.append(f"tp={tp} must divide the {world} devices (try {divisors(world)})")
    problem = config.tp_split_problem(tp) if tp >= 1 else None
    if problem:
        ok = [d for d in divisors(world) if config.tp_split_problem(d) is None]
        out.append(f"{problem} (valid tp here: {ok})")
    return out


def check_layout(config: Any, world: int, tp: int, ep: int, redundant: int, hardware: Any = None,
                 batch: int | None = None) -> list[str]:
    """Every rule (tp, ep, redundant) breaks on `world` devices, each as a sentence saying what would work; tp's
    own problems first."""
    out = tp_problems(config, world, tp)
    E = config.n_routed_experts
    if ep < 1 or world % ep:
        out.append(f"ep={ep} must divide the {world} devices (try {divisors(world)})")
    if redundant < 0:
        out.append(f"redundant={redundant}: expected >= 0")
    elif ep >= 1 and redundant > (ep - 1) * E:      # placement puts at most one replica of an expert per EP rank
        out.append(f"redundant={redundant}: at most {(ep - 1) * E} with ep={ep} (one replica of an expert per EP "
                   f"rank; use at most --redundant {(ep - 1) * E} or a larger ep)")
    elif ep >= 1 and (E + redundant) % ep:
        need = (-E - redundant) % ep
        out.append(f"ep={ep} must divide the {E}+{redundant} physical expert slots "
                   f"(use --redundant {redundant + need}, or an ep dividing {E + redundant})")
    lim = getattr(hardware, "limits", None) or {}
    if lim and tp >= 1 and config.n_heads % tp == 0:
        heads = config.n_heads // tp
        if "fia_heads_per_rank" in lim and heads not in lim["fia_heads_per_rank"]:
            out.append(f"tp={tp} gives {heads} attention heads per rank; fused attention takes "
                       f"{lim['fia_heads_per_rank']}")
        if "indexer_heads_per_rank_max" in lim and config.index_n_heads // tp > lim["indexer_heads_per_rank_max"]:
            out.append(f"tp={tp} gives {config.index_n_heads // tp} indexer heads per rank; the lightning "
                       f"indexer takes <= {lim['indexer_heads_per_rank_max']} on {hardware.soc}")
    if lim and ep > 1:
        lo, hi = lim.get("dispatch_ep", (2, 1 << 30))
        if not lo <= ep <= hi:
            out.append(f"ep={ep}: fused dispatch/combine takes EP {lo}-{hi}")
        hlo, hhi = lim.get("dispatch_hidden", (0, 1 << 30))
        if not hlo <= config.dim <= hhi:
            out.append(f"hidden size {config.dim}: fused dispatch/combine takes {hlo}-{hhi} (use ep=1)")
        if config.n_activated_experts > lim.get("dispatch_topk_max", 1 << 30):
            out.append(f"top-k {config.n_activated_experts}: fused dispatch takes <= {lim['dispatch_topk_max']}")
        if batch and tp >= 1 and world % tp == 0:
            per_rank = math.ceil(batch / (world // tp))
            cap = lim.get("dispatch_tokens_per_rank_max", 1 << 30)
            if per_rank > cap:
                out.append(f"batch {batch} gives {per_rank} decode tokens per rank; fused dispatch takes <= {cap} "
                           f"(lower --batch or use more data-parallel ranks)")
    return out


@dataclass
class Candidate:
    """One layout and its costs (bytes per rank; microseconds per token; milliseconds per step)."""

    dp: int
    tp: int
    ep: int
    redundant: int
    slots_per_rank: int
    peak_bytes: int
    capacity_bytes: float
    fits: bool
    comm_us_per_token: float
    tp_comm_us_per_token: float
    ep_comm_us_per_token: float
    step_ms: float
    compute_ms: float
    memory_ms: float
    tokens_per_s_per_device: float

    @property
    def margin_bytes(self) -> float:
        return self.capacity_bytes - self.peak_bytes

    def key(self) -> tuple:
        comm = float(f"{self.comm_us_per_token:.2g}")
        return (not self.fits, comm, self.step_ms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["margin_bytes"] = self.margin_bytes
        return d


def ep_exchange_bytes(n_layers: int, topk: int, dim: int, tp: int, ep: int, dispatch_b: float,
                      combine_b: float = 2) -> float:
    """Bytes one rank sends to other ranks per decoded token for the expert exchange: each of a token's top-k
    choices travels out (dispatch) and back (combine, BF16); tensor-parallel ranks split the tokens, and with
    uniform routing a fraction (ep - 1) / ep of the destinations is remote."""
    return n_layers * topk * dim * (dispatch_b + combine_b) / tp * (ep - 1) / ep


def _link_time(nbytes: float, group: int, dpn: int, hw: Any) -> float:
    """Seconds to move `nbytes` spread evenly over the other ranks of a group of `group` consecutive ranks."""
    if group <= 1:
        return 0.0
    local = min(group, dpn) - 1
    remote = group - 1 - local
    return (nbytes * local / (group - 1)) / (hw.intra_node_gbps * 1e9) + \
           (nbytes * remote / (group - 1)) / (hw.inter_node_gbps * 1e9)


def evaluate(config: Any, world: int, tp: int, ep: int, redundant: int, hw: Any, s: MemorySettings) -> Candidate:
    """Memory, communication and decode-step time of one layout on hardware `hw`."""
    dp = world // tp
    E, k, d = config.n_routed_experts, config.n_activated_experts, config.dim
    slots = (E + redundant) // ep
    runs = memory_per_rank(config, world, tp, slots, s)
    peak = max(sum(r["bytes"].values()) for r in runs)
    ratios = layer_ratios(config)
    n_layers = len(ratios)
    n_csa = sum(1 for r in ratios if r == 4)
    dpn = hw.devices_per_node
    # --- communication per token
    ar_bytes = n_layers * d * 2 + n_csa * (s.context // 4) * 4          # wo_b output BF16, indexer scores FP32
    tp_time = _link_time(2 * (tp - 1) / tp * ar_bytes, tp, dpn, hw)     # ring all-reduce
    dispatch_b = 1 if hw.limits else 2                                   # fused dispatch quantises to INT8
    ep_time = _link_time(ep_exchange_bytes(n_layers, k, d, tp, ep, dispatch_b), ep, dpn, hw)
    # --- decode step on one rank
    t = math.ceil(s.batch / dp)                                          # decode tokens per rank
    f = weight_formats(config, s.weights)
    attn_params = sum(_attn_params(config, r) for r in ratios) / tp
    flops = 2 * t * (attn_params + 3 * d * config.moe_inter_dim * (n_layers * (1 + k / tp)))
    flops += 2 * t * config.vocab_size // tp * d
    kv = kv_bytes(config, s.kv_layout)
    ctx = s.context
    kv_read = 0.0
    for r in ratios:
        n = config.window_size + (min(config.index_topk, ctx // 4) if r == 4 else ctx // r if r else 0)
        kv_read += n * kv["entry_bytes"]
        flops += 2 * 2 * t * (config.n_heads // tp) * config.head_dim * n
        if r == 4:
            kv_read += ctx // 4 * kv["index_entry_bytes"]                        # indexer keys
            flops += 2 * t * (config.index_n_heads // tp) * config.index_head_dim * (ctx // 4)
    pairs_per_slot = t * dp * k / (world // ep) / (E + redundant)         # expected tokens per expert slot
    touched = 1 - math.exp(-pairs_per_slot)
    w = runs[0]["bytes"]     # weights read per step: attention, shared expert, the BF16 head, the experts touched
    read = w["attention"] + w["shared_expert"] + config.vocab_size // tp * d * 2 + \
        n_layers * slots * expert_bytes(config, f["expert"]) * touched + t * kv_read
    dtype = hw.compute_dtype(s.weights)
    compute_s = flops / (hw.tflops[dtype] * 1e12)
    memory_s = read / (hw.memory_gbps * 1e9)
    step_s = max(compute_s, memory_s) + t * (tp_time + ep_time)
    cap = hw.memory_bytes
    return Candidate(dp=dp, tp=tp, ep=ep, redundant=redundant, slots_per_rank=slots, peak_bytes=int(peak),
                     capacity_bytes=cap, fits=peak <= cap, comm_us_per_token=(tp_time + ep_time) * 1e6,
                     tp_comm_us_per_token=tp_time * 1e6, ep_comm_us_per_token=ep_time * 1e6,
                     step_ms=step_s * 1e3, compute_ms=compute_s * 1e3, memory_ms=memory_s * 1e3,
                     tokens_per_s_per_device=s.batch / step_s / world)


def _attn_params(config: Any, ratio: int) -> float:
    """Multiply-accumulates per token of one layer's attention projections (all heads)."""
    d, q, hd = config.dim, config.q_lora_rank, config.head_dim
    p = d * q + d * hd + q * config.n_heads * hd + config.n_heads * hd * config.o_lora_rank + \
        config.o_groups * config.o_lora_rank * d
    if ratio:
        p += 2 * d * (2 if ratio == 4 else 1) * hd
    if ratio == 4:
        p += q * config.index_n_heads * config.index_head_dim + d * config.index_n_heads
    return p


def search(config: Any, world: int, hw: Any, s: MemorySettings, redundant: int | None = None,
           tp: int | None = None, ep: int | None = None) -> list[Candidate]:
    """All valid layouts (optionally with tp / ep forced), best first. Raises PlanError when none is valid."""
    E = config.n_routed_experts
    found, reasons = [], []
    ds = divisors(world)
    for t in ([tp] if tp else ds):
        bad_tp = tp_problems(config, world, t)
        if bad_tp:                  # the same first problem for every ep: checked once
            if bad_tp[0] not in reasons:
                reasons.append(bad_tp[0])
            continue
        for e in ([ep] if ep else ds):
            r = redundant if redundant is not None else (-E) % e
            problems = check_layout(config, world, t, e, r, hardware=hw, batch=s.batch)
            if problems:
                if problems[0] not in reasons:
                    reasons.append(problems[0])
                continue
            found.append(evaluate(config, world, t, e, r, hw, s))
    if not found:
        raise PlanError(f"no valid layout for {world} x {hw.name}: {'; '.join(reasons[:3])}")
    return sorted(found, key=Candidate.key)


def explain(best: Candidate, others: list[Candidate]) -> str:
    """One sentence on why `best` ranks first."""
    if not others:
        return "the only valid layout"
    o = others[0]
    name = f"dp{o.dp}/tp{o.tp}/ep{o.ep}"
    if best.fits and not o.fits:
        return f"the only layout that fits (next, {name}, needs {o.peak_bytes / GiB:.1f} GiB per rank)"
    if float(f"{best.comm_us_per_token:.2g}") < float(f"{o.comm_us_per_token:.2g}"):
        return (f"least communication: {best.comm_us_per_token:.1f} us/token vs {o.comm_us_per_token:.1f} "
                f"for {name}")
    return f"same communication as {name}, faster decode step: {best.step_ms:.2f} ms vs {o.step_ms:.2f}"


def plan_deployment(config: Any, hw: Any, world: int, s: MemorySettings, *, redundant: int | None = None,
                    tp: int | None = None, ep: int | None = None, expert_load: Any = None, n_groups: int = 1,
                    model: str = "custom", top: int = 5, distinct: bool = False) -> Any:
    """Search layouts on `world` devices of `hw`, then place experts for the best one: a `Plan`."""
    from ascend.planner.plan import make_plan

    if hw.max_nodes and world > hw.max_nodes * hw.devices_per_node:
        raise PlanError(f"{world} devices: {hw.name} has at most {hw.max_nodes * hw.devices_per_node} "
                        f"({hw.max_nodes} nodes x {hw.devices_per_node})")
    ranked = search(config, world, hw, s, redundant=redundant, tp=tp, ep=ep)
    best = ranked[0]
    if not best.fits:
        closest = min(ranked, key=lambda c: c.peak_bytes)
        raise PlanError(_no_fit(config, hw, world, s, closest, redundant, model))
    shown = [c.to_dict() for c in ranked[:top]]
    shown[0]["why"] = explain(best, ranked[1:])
    return make_plan(config, world, best.tp, best.ep, best.redundant, expert_load, hardware=hw, settings=s,
                     n_groups=n_groups, model=model, distinct=distinct, candidates=shown)


def _fits(config: Any, world: int, hw: Any, s: MemorySettings, redundant: int | None) -> bool:
    try:
        return search(config, world, hw, s, redundant=redundant)[0].fits
    except PlanError:
        return False


def _no_fit(config: Any, hw: Any, world: int, s: MemorySettings, best: Candidate, redundant: int | None,
            model: str) -> str:
    """One line: by how much the best layout misses, and what would fit instead."""
    ideas = []
    limit = hw.max_nodes * hw.devices_per_node if hw.max_nodes else max(world * 64, 8 * hw.devices_per_node)
    step = hw.devices_per_node if world % hw.devices_per_node == 0 else 1
    n = world + step
    while n <= limit:
        if _fits(config, n, hw, s, redundant):
            nodes = f" ({n // hw.devices_per_node} nodes)" if n % hw.devices_per_node == 0 else ""
            ideas.append(f"{n} devices{nodes}")
            break
        n = n + step if n < 4 * world else n * 2 // step * step
    for w in ("keep", "int8"):
        if w != s.weights and _fits(config, world, hw, replace(s, weights=w), redundant):
            ideas.append(f"--weights {w}")
            break
    if s.kv_layout != "fp8" and _fits(config, world, hw, replace(s, kv_layout="fp8"), redundant):
        ideas.append("--kv fp8")
    ctx = s.context // 2
    while ctx >= 1024:
        if _fits(config, world, hw, replace(s, context=ctx), redundant):
            ideas.append(f"--context {ctx}")
            break
        ctx //= 2
    if s.batch > 1 and _fits(config, world, hw, replace(s, batch=max(1, s.batch // 4)), redundant):
        ideas.append(f"--batch {max(1, s.batch // 4)}")
    over = (best.peak_bytes - best.capacity_bytes) / GiB
    return (f"{model} ({s.weights} weights, context {s.context}, batch {s.batch}) does not fit on {world} x "
            f"{hw.name}: the leanest layout dp{best.dp}/tp{best.tp}/ep{best.ep} needs {best.peak_bytes / GiB:.1f} GiB "
            f"per rank, {over:.1f} GiB more than the {best.capacity_bytes / GiB:.0f} GiB there; would fit: "
            + (", or ".join(ideas) if ideas else "none of more devices, other weights or shorter context"))

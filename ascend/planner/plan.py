"""`Plan`: the parallel layout and expert placement that convert/ and the launcher follow.

Ranks: world = dp * tp, rank = dp_rank * tp + tp_rank. Routed experts are spread over ep ranks
(ep divides world, ep_rank = rank % ep); world / ep expert-parallel groups each hold every expert.
MoE layer ids: 0 .. n_layers-1 are the main layers, n_layers + i is MTP layer i. Per MoE layer
`phy2log[layer]` has ep * slots_per_rank entries; ep rank r owns slots [r*S, (r+1)*S).
`log2phy[layer][e]` lists expert e's slots (in slot order, -1 padded) and `logcnt[layer][e]` counts
them, as DeepSeek's EPLB returns them.

plan.json (schema "ascend-deploy/plan", version 1) is documented in docs/planner.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ascend.errors import parse_json
from ascend.files import write_atomic
from ascend.planner.errors import PlanError
from ascend.planner import placement as pl

__all__ = ["Plan", "PlanError", "SCHEMA", "SCHEMA_VERSION", "make_plan"]

SCHEMA = "ascend-deploy/plan"
SCHEMA_VERSION = 1


@dataclass
class Plan:
    """A deployment layout: degrees, mesh, expert placement per MoE layer, and what it costs per rank."""

    world_size: int
    tp: int
    ep: int
    n_layers: int                      # main layers; MoE layers are n_layers + n_mtp_layers
    n_mtp_layers: int
    n_routed_experts: int
    phy2log: np.ndarray                # [n_moe_layers, ep * slots_per_rank] int64
    model: str = "custom"
    devices_per_node: int | None = None
    hardware: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)    # context, batch, weights, kv_layout
    memory: list[dict[str, Any]] = field(default_factory=list)  # runs of ranks with bytes by component
    capacity_bytes: float | None = None
    balance: dict[str, list[float]] = field(default_factory=dict)  # per layer: before, after, eplb, bound
    candidates: list[dict[str, Any]] = field(default_factory=list)  # layout search, best first
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.phy2log = np.asarray(self.phy2log, dtype=np.int64)
        w, tp, ep, E = self.world_size, self.tp, self.ep, self.n_routed_experts
        if min(w, tp, ep, E) < 1 or w % tp or w % ep:
            raise PlanError(f"plan: world_size {w}, tp {tp}, ep {ep}: expected tp and ep dividing world_size")
        L = self.n_layers + self.n_mtp_layers
        if self.phy2log.ndim != 2 or self.phy2log.shape[0] != L or self.phy2log.shape[1] % ep:
            raise PlanError(f"plan: phy2log shape {list(self.phy2log.shape)}, expected [{L}, a multiple of ep={ep}]")
        if self.phy2log.size and (self.phy2log.min() < 0 or self.phy2log.max() >= E):
            raise PlanError(f"plan: phy2log holds ids outside 0..{E - 1}")
        missing = np.flatnonzero((pl.logcnt_of(self.phy2log, E) == 0).any(1))
        if missing.size:
            raise PlanError(f"plan: MoE layer {int(missing[0])} leaves some of the {E} experts without a slot")

    # ------------------------------------------------------------------ derived layout
    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def n_moe_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[1] // self.ep

    @property
    def n_physical_experts(self) -> int:
        return self.phy2log.shape[1]

    @property
    def redundant(self) -> int:
        return self.n_physical_experts - self.n_routed_experts

    @property
    def logcnt(self) -> np.ndarray:
        return pl.logcnt_of(self.phy2log, self.n_routed_experts)

    @property
    def log2phy(self) -> np.ndarray:
        return pl.log2phy_of(self.phy2log, self.n_routed_experts)

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def experts_on_rank(self, layer: int, rank: int) -> list[int]:
        """Logical expert id held in each local slot of `rank` in MoE layer `layer`."""
        if not 0 <= rank < self.world_size or not 0 <= layer < self.n_moe_layers:
            raise PlanError(f"plan: rank {rank} / layer {layer} outside world {self.world_size} / "
                            f"{self.n_moe_layers} MoE layers")
        s = self.slots_per_rank
        r = self.ep_rank(rank)
        return [int(e) for e in self.phy2log[layer, r * s:(r + 1) * s]]

    def memory_of_rank(self, rank: int) -> dict[str, int]:
        for run in self.memory:
            if run["ranks"][0] <= rank <= run["ranks"][1]:
                return dict(run["bytes"])
        raise PlanError(f"plan: no memory entry for rank {rank}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        cnt, l2p = self.logcnt, self.log2phy
        return {
            "schema": SCHEMA,
            "version": self.version,
            "model": {"name": self.model, "n_layers": self.n_layers, "n_mtp_layers": self.n_mtp_layers,
                      "n_routed_experts": self.n_routed_experts},
            "mesh": {"world_size": self.world_size, "dp": self.dp, "tp": self.tp, "ep": self.ep,
                     "devices_per_node": self.devices_per_node, "hardware": self.hardware,
                     "rank": "dp_rank * tp + tp_rank", "ep_rank": "rank % ep"},
            "experts": {
                "n_logical": self.n_routed_experts, "n_physical": self.n_physical_experts,
                "redundant": self.redundant, "slots_per_rank": self.slots_per_rank,
                "layers": [{"layer": i, "phy2log": self.phy2log[i].tolist(),
                            "log2phy": [row[:c].tolist() for row, c in zip(l2p[i], cnt[i])],
                            "logcnt": cnt[i].tolist()} for i in range(self.n_moe_layers)],
            },
            "settings": self.settings,
            "memory": {"capacity_bytes": self.capacity_bytes, "per_rank": self.memory},
            "balance": self.balance,
            "candidates": self.candidates,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise PlanError(f"{source}: not a plan (expected \"schema\": \"{SCHEMA}\")")
        if d.get("version") != SCHEMA_VERSION:
            raise PlanError(f"{source}: plan schema version {d.get('version')!r}, this toolkit reads {SCHEMA_VERSION}")
        try:
            model, mesh, experts = d["model"], d["mesh"], d["experts"]
            layers = experts["layers"]
            plan = cls(
                world_size=int(mesh["world_size"]), tp=int(mesh["tp"]), ep=int(mesh["ep"]),
                n_layers=int(model["n_layers"]), n_mtp_layers=int(model["n_mtp_layers"]),
                n_routed_experts=int(model["n_routed_experts"]),
                phy2log=np.array([layer["phy2log"] for layer in layers], dtype=np.int64).reshape(len(layers), -1),
                model=str(model.get("name", "custom")), devices_per_node=mesh.get("devices_per_node"),
                hardware=mesh.get("hardware"), settings=dict(d.get("settings") or {}),
                memory=list((d.get("memory") or {}).get("per_rank") or []),
                capacity_bytes=(d.get("memory") or {}).get("capacity_bytes"),
                balance=dict(d.get("balance") or {}), candidates=list(d.get("candidates") or []))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source}: malformed plan ({type(e).__name__}: {e})") from None
        except PlanError as e:      # the layout's own checks, said of this file
            raise PlanError(f"{source}: {str(e).removeprefix('plan: ')}") from None
        # the redundant views must agree with phy2log
        cnt, l2p = plan.logcnt, plan.log2phy
        for i, layer in enumerate(layers):
            if layer.get("logcnt") != cnt[i].tolist() or layer.get("log2phy") != [
                    row[:c].tolist() for row, c in zip(l2p[i], cnt[i])]:
                raise PlanError(f"{source}: MoE layer {i}: log2phy / logcnt disagree with phy2log")
        if mesh.get("dp", plan.dp) != plan.dp:
            raise PlanError(f"{source}: mesh dp {mesh.get('dp')!r} != world_size / tp = {plan.dp}")
        _check_reports(plan, source)
        return plan

    def same_as(self, recorded: Any, source: str) -> bool:
        """Whether `recorded` (the plan a manifest was converted with) is this plan, both in `to_dict`'s form:
        verify and the launcher refuse shards converted with another."""
        return self.to_dict() == Plan.from_dict(recorded, source).to_dict()

    def save(self, path: str | Path) -> None:
        """Write plan.json whole or not at all (a temporary name, then a rename)."""
        path = Path(path)
        try:
            write_atomic(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        except OSError as e:
            raise PlanError(f"{path}: cannot write the plan ({e.strerror or e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = parse_json(path.read_text())
        except (OSError, ValueError) as e:            # ValueError: not JSON, or not UTF-8
            raise PlanError(f"{path}: cannot read plan ({type(e).__name__}: {e})") from None
        return cls.from_dict(data, str(path))


_CANDIDATE_NUMBERS = ("dp", "tp", "ep", "redundant", "slots_per_rank", "peak_bytes", "margin_bytes",
                      "comm_us_per_token", "step_ms", "tokens_per_s_per_device")


def _check_reports(plan: Plan, source: str) -> None:
    """What a plan reports (memory per rank, balance per layer, the layouts searched) is optional, but where present
    `plan show` and the plots read it as the planner writes it: refuse a hand-edited or cut-short section here."""
    from ascend.planner.memory import COMPONENTS

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    def need(ok: bool, where: str, expected: str) -> None:
        if not ok:
            raise PlanError(f"{source}: {where}: expected {expected}")

    for i, run in enumerate(plan.memory):
        need(isinstance(run, dict) and isinstance(run.get("ranks"), list) and len(run["ranks"]) == 2
             and all(isinstance(r, int) for r in run["ranks"]) and isinstance(run.get("bytes"), dict)
             and all(number(run["bytes"].get(c)) for c in COMPONENTS),
             f"memory.per_rank[{i}]",
             f'{{"ranks": [first, last], "bytes": {{...}}}} with bytes of {", ".join(COMPONENTS)}')
    need(plan.capacity_bytes is None or number(plan.capacity_bytes), "memory.capacity_bytes", "a number")
    L = plan.n_moe_layers
    for key in ("before", "after", "eplb", "bound") if plan.balance else ():
        v = plan.balance.get(key)
        need(isinstance(v, list) and len(v) == L and all(number(x) for x in v), f"balance.{key}",
             f"{L} numbers, one per MoE layer")
    stored = plan.balance.get("rank_load")
    if stored is not None:
        need(isinstance(stored, dict) and all(
            np.asarray(stored.get(k), dtype=object).shape == (L, plan.ep)
            and all(number(x) for x in np.asarray(stored[k], dtype=object).flat) for k in ("before", "after")),
            "balance.rank_load", f"before / after loads of shape [{L}, {plan.ep}]")
    for i, c in enumerate(plan.candidates):
        need(isinstance(c, dict) and all(number(c.get(k)) for k in _CANDIDATE_NUMBERS)
             and isinstance(c.get("fits"), bool), f"candidates[{i}]",
             f"numbers {', '.join(_CANDIDATE_NUMBERS)} and 'fits' true or false")


def make_plan(config: Any, world_size: int, tp: int, ep: int, redundant: int = 0,
              expert_load: np.ndarray | None = None, *, hardware: Any = None, devices_per_node: int | None = None,
              settings: Any = None, n_groups: int = 1, model: str = "custom", distinct: bool = False,
              candidates: list[dict[str, Any]] | None = None) -> Plan:
    """Plan for given degrees: checks the layout rules, places experts, and counts memory per rank.

    `expert_load` is [n_layers (+ n_mtp_layers), n_routed_experts] token counts (None: uniform);
    `hardware` (an `ascend.hardware.Hardware`, optional) adds its fused-operator limits and capacity;
    `distinct` keeps replicas of one expert on different ranks even at some cost in balance
    (vllm-ascend's static map needs it; `balance` records the result).
    """
    from ascend.planner.layout import check_layout
    from ascend.planner.memory import MemorySettings, memory_per_rank

    settings = settings or MemorySettings()
    E, L = config.n_routed_experts, config.n_layers + config.n_mtp_layers
    problems = check_layout(config, world_size, tp, ep, redundant, hardware=hardware, batch=settings.batch)
    if problems:
        raise PlanError(f"tp={tp} ep={ep} redundant={redundant} on {world_size} devices: {problems[0]}")
    n_slots = E + redundant
    if expert_load is None:
        load = np.ones((L, E))
    else:
        load = pl.check_load(expert_load)
        if load.shape == (config.n_layers, E) and L > config.n_layers:
            load = np.concatenate([load, np.repeat(load.mean(0, keepdims=True), L - config.n_layers, 0)])
        if load.shape != (L, E):
            raise PlanError(f"expert load has shape {list(load.shape)}; expected [{config.n_layers}, {E}] "
                            f"or [{L}, {E}]")
    dpn = devices_per_node or (hardware.devices_per_node if hardware is not None else None)
    ranks_per_node = dpn if dpn and ep % dpn == 0 and ep > dpn else None
    if expert_load is None and redundant == 0:       # no statistics: the official contiguous split
        phy2log = pl.contiguous_placement(L, E, n_slots)
    else:
        phy2log = pl.place(load, ep, n_slots // ep, ranks_per_node=ranks_per_node, n_groups=n_groups,
                           distinct=distinct)
    eplb = pl.eplb_baseline(load, n_slots, ep, n_groups=n_groups, n_nodes=ep // ranks_per_node if ranks_per_node else 1)
    balance = {
        "before": pl.balancedness(load, pl.contiguous_placement(L, E, n_slots), ep).round(6).tolist(),
        "after": pl.balancedness(load, phy2log, ep).round(6).tolist(),
        "eplb": pl.balancedness(load, eplb, ep).round(6).tolist(),
        "bound": pl.bound_balancedness(load, n_slots, ep).round(6).tolist(),
        "load": "uniform" if expert_load is None else "given",
    }
    return Plan(world_size=world_size, tp=tp, ep=ep, n_layers=config.n_layers, n_mtp_layers=config.n_mtp_layers,
                n_routed_experts=E, phy2log=phy2log, model=model, devices_per_node=dpn,
                hardware=getattr(hardware, "name", None),
                settings={"context": settings.context, "batch": settings.batch, "weights": settings.weights,
                          "kv_layout": settings.kv_layout},
                memory=memory_per_rank(config, world_size, tp, n_slots // ep, settings),
                capacity_bytes=getattr(hardware, "memory_bytes", None), balance=balance,
                candidates=list(candidates or []))

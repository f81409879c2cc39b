"""`ParallelContext`: where this process sits in tensor and expert parallelism, and the collectives it needs.

The model never reads global state: every parallel layer gets a `ParallelContext`. The default is one process
(no groups, no communication), so a single-device model needs nothing.

* Tensor parallelism (tp): attention heads, the vocabulary and the indexer heads are split over `tp_group`.
* Expert parallelism (ep): routed experts are spread over `ep_group`. Each rank holds `S` physical expert slots
  per MoE layer; `phy2log[layer]` (length ep_size * S, rank r owning slots [r*S, (r+1)*S)) names the logical
  expert in every slot, as in the planner's `Plan`. A logical expert may sit in several slots (replicas); the
  token-expert pairs of such an expert are spread over its replicas by token index, so each pair is computed
  exactly once in the group. Without `phy2log` the experts are split contiguously, E / ep_size per rank.
  By default the partial outputs are summed with an all-reduce over the ep group (every rank sees the same
  tokens); `moe_exchange` plugs in a dispatch / combine instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ascend.errors import AscendDeployError

__all__ = ["ParallelError", "ParallelContext", "ExpertSlots"]


class ParallelError(AscendDeployError):
    """A model dimension or expert layout that the requested parallel split cannot divide."""


@dataclass(frozen=True)
class ExpertSlots:
    """This rank's expert slots in one MoE layer.

    experts[i]: logical expert id in local slot i; replica[i]: which of that expert's replicas slot i is
    (0-based, in global slot order); n_replicas[i]: how many replicas the expert has in the whole ep group.
    Slot i computes the (token t, expert experts[i]) pairs with t % n_replicas[i] == replica[i].
    """

    experts: tuple[int, ...]
    replica: tuple[int, ...]
    n_replicas: tuple[int, ...]


@dataclass
class ParallelContext:
    """Ranks, sizes and process groups of tensor and expert parallelism (default: a single process)."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None
    phy2log: Mapping[int, Sequence[int]] = field(default_factory=dict)
    # MoE layer id -> exchange(x [N, dim], weights [N, k], indices [N, k], expert_fn) -> routed output [N, dim],
    # combined over the ep group (e.g. ascend.expert_parallel.ExpertParallel's all-to-all); expert_fn(e, rows,
    # row_weights [n]) runs local expert e. Layers without one use the all-reduce combine of MoE.routed.
    moe_exchange: Mapping[int, Callable[..., torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, rank, size in (("tp", self.tp_rank, self.tp_size), ("ep", self.ep_rank, self.ep_size)):
            if size < 1 or not 0 <= rank < size:
                raise ParallelError(f"parallel context: {name}_rank = {rank}, "
                                    f"expected 0 <= rank < {name}_size = {size}")

    # ----------------------------------------------------------------- sizes
    def split(self, n: int, what: str) -> int:
        """n / tp_size, or a ParallelError naming `what` when it does not divide."""
        if n % self.tp_size:
            raise ParallelError(f"{what} = {n} is not divisible by the tensor-parallel size {self.tp_size}")
        return n // self.tp_size

    def expert_slots(self, layer_id: int, n_experts: int) -> ExpertSlots:
        """The logical experts held in this rank's slots of MoE layer `layer_id`, with their replica shares."""
        layout = self.phy2log.get(layer_id)
        if layout is None:
            if n_experts % self.ep_size:
                raise ParallelError(f"n_routed_experts = {n_experts} is not divisible by the expert-parallel "
                                    f"size {self.ep_size} (give a phy2log layout for uneven splits)")
            per_rank = n_experts // self.ep_size
            layout = list(range(n_experts))
        else:
            layout = [int(e) for e in layout]
            if len(layout) % self.ep_size or not set(layout) == set(range(n_experts)):
                raise ParallelError(f"phy2log of layer {layer_id}: expected a multiple of ep_size = {self.ep_size} "
                                    f"slots covering every expert 0..{n_experts - 1}")
            per_rank = len(layout) // self.ep_size
        seen: dict[int, int] = {}
        replica_of_slot = []
        for e in layout:
            replica_of_slot.append(seen.get(e, 0))
            seen[e] = seen.get(e, 0) + 1
        mine = range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)
        return ExpertSlots(experts=tuple(layout[p] for p in mine),
                           replica=tuple(replica_of_slot[p] for p in mine),
                           n_replicas=tuple(seen[layout[p]] for p in mine))

    # ----------------------------------------------------------------- collectives (no-ops on one rank)
    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the tensor-parallel group (in place when distributed; returns x)."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_reduce_ep(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the expert-parallel group (in place when distributed; returns x)."""
        if self.ep_size > 1:
            dist.all_reduce(x, group=self.ep_group)
        return x

    def all_gather_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' x along the last dim, in tp rank order."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

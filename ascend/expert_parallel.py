"""Expert parallelism: send each token to the ranks holding its routed experts and sum the results back.

A MoE layer's routed experts live in physical slots spread over the ep ranks of an expert-parallel
group (the plan's `phy2log`: rank r of the group holds slots [r*S, (r+1)*S)); a hot expert may have
several replicas. For every (token, chosen expert) pair one replica is picked, rotating with the
token's row so an expert's tokens spread evenly over its replicas. Replicas hold the same weights,
so the choice changes only who computes, never the result.

Two exchange schemes, chosen by the plan:
- "alltoall": each rank sends exactly the rows an expert elsewhere needs (all_to_all), the experts run,
  and the outputs travel back the same way (the usual EP dispatch/combine).
- "allgather": every rank of the group gathers all tokens, runs its own slots on them, and the partial
  sums are reduced back to their owners (reduce-scatter). More traffic, but only collectives every
  backend has, and a fixed message size.
With tensor parallelism the ranks of a tensor-parallel group hold the same tokens; each takes one
share of the rows into the exchange and the shares are all-gathered afterwards, so no expert
computes a token twice.

The all-to-all comes in two forms. The sized one first exchanges row counts and reads them on the
host (a sync per layer), then moves exactly the rows needed. The padded one (`padded=True`, what a
captured decode graph runs) gives every destination a fixed `C = tokens x top-k` rows, room for all
of this rank's pairs, marks unused rows with slot 0 in a slot+1 field, and packs slot and gate weight
into extra columns of the token rows, so dispatch and combine are one all-to-all each of fixed size
with no host sync. Every rank of the group must then hold the same number of tokens (the decode
graphs' batch bucket, agreed across ranks).

Every exchange counts what it moves (`ExpertParallel.traffic`, a `Traffic`): the bytes this rank
sends to and receives from other ranks, by phase, computed from sizes the exchange already holds on
the host (no extra synchronisation). They are the logical payload of each collective (what one
rank's data must reach the others), not the wire bytes of a particular algorithm; a rank's own share
stays local and is not counted. The padded all-to-all counts on the device instead (a replayed graph
runs no Python), its unused rows under "padding"; reading the counts syncs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ascend.errors import AscendDeployError

# expert_fn(logical expert id, rows [n, dim], routing weights [n]) -> rows [n, dim] in the rows' dtype
# (the all-to-all combine sends them back in that dtype)
ExpertFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
# pair_fn(rows [n, dim], routing weights [n], local slot [n]) -> weight x expert(row) [n, dim] in the rows'
# dtype, zeros where the slot is -1: all local experts in one fixed-shape call (MoE.run_pairs)
PairFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SCHEMES = ("alltoall", "allgather")


class ExpertParallelError(AscendDeployError):
    """An expert placement that cannot serve the routed experts (missing expert, bad slot count)."""


@dataclass(frozen=True)
class ExpertLayout:
    """Physical slots of one MoE layer over an expert-parallel group of `ep_size` ranks."""

    phy2log: tuple[int, ...]
    ep_size: int
    n_experts: int
    device: torch.device | str = "cpu"     # where the routing tables live: the tokens' device
    log2phy: torch.Tensor = field(init=False, repr=False, compare=False)  # [E, max replicas], -1 padded
    logcnt: torch.Tensor = field(init=False, repr=False, compare=False)   # [E]

    def __post_init__(self) -> None:
        if len(self.phy2log) % self.ep_size:
            raise ExpertParallelError(f"phy2log has {len(self.phy2log)} slots, expected a multiple of ep={self.ep_size}")
        replicas = [[] for _ in range(self.n_experts)]
        for slot, expert in enumerate(self.phy2log):
            if not 0 <= expert < self.n_experts:
                raise ExpertParallelError(f"phy2log slot {slot} holds expert {expert}, expected 0..{self.n_experts - 1}")
            replicas[expert].append(slot)
        missing = [e for e, r in enumerate(replicas) if not r]
        if missing:
            raise ExpertParallelError(f"phy2log places no replica of experts {missing[:8]}")
        width = max(map(len, replicas))
        object.__setattr__(self, "log2phy", torch.tensor([r + [-1] * (width - len(r)) for r in replicas],
                                                         device=self.device))
        object.__setattr__(self, "logcnt", torch.tensor([len(r) for r in replicas], device=self.device))

    @property
    def slots_per_rank(self) -> int:
        return len(self.phy2log) // self.ep_size

    def experts_on(self, ep_rank: int) -> list[int]:
        """Logical expert of each local slot of `ep_rank`."""
        s = self.slots_per_rank
        return list(self.phy2log[ep_rank * s:(ep_rank + 1) * s])

    def choose_slots(self, indices: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Physical slot for every (row, k) pair: replica (row + offset + k) mod replicas of the expert."""
        dev = indices.device
        rows = torch.arange(indices.shape[0], device=dev).unsqueeze(1) + offset
        cols = torch.arange(indices.shape[1], device=dev).unsqueeze(0)
        replica = (rows + cols) % self.logcnt[indices]
        return self.log2phy[indices, replica]


def run_local(layout: ExpertLayout, ep_rank: int, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
              rows: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Sum over pairs whose slot is on `ep_rank` of weight * expert(x[row]), as fp32 [len(x), dim].

    `slots`, `weights`, `rows` are flat per pair; pairs on other ranks are ignored.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    first = ep_rank * layout.slots_per_rank
    for local, expert in enumerate(layout.experts_on(ep_rank)):
        pick = (slots == first + local).nonzero().squeeze(1)
        if pick.numel():
            r = rows[pick]
            out.index_add_(0, r, expert_fn(expert, x[r], weights[pick]).float())
    return out


PHASES = ("counts", "dispatch", "meta", "combine", "tp_gather", "padding")


@dataclass
class Traffic:
    """Bytes sent to / received from other ranks by one rank's expert exchanges, by phase.

    counts: per-destination row counts (all-to-all) or row totals (all-gather); dispatch: token rows
    to the experts (every routed pair, a batch's padding rows included); meta: slot ids and gate weights
    of those rows (the padded all-to-all: of every row it sends); combine: expert outputs back to their
    tokens; tp_gather: the tensor-parallel shares of the result; padding: the unused rows of the padded
    all-to-all (dispatch and combine).

    `on_device` holds counts added inside captured graphs ([calls, sent by phase, received by phase]), when the
    exchange was asked to count there (else those calls go uncounted); `fold` moves them to the host fields (one
    sync), as every reader does first.
    """

    calls: int = 0
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    on_device: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent[phase] += int(sent)
        self.received[phase] += int(received)

    def add_on_device(self, phase: str, sent: torch.Tensor | int, received: torch.Tensor | int) -> None:
        """Add without a host sync (`sent` / `received` may be device tensors); nothing without `on_device`."""
        if self.on_device is not None:
            i = PHASES.index(phase)
            self.on_device[1 + i] += sent
            self.on_device[1 + len(PHASES) + i] += received

    def add_call(self, on_device: bool = False) -> None:
        if not on_device:
            self.calls += 1
        elif self.on_device is not None:
            self.on_device[0] += 1

    def fold(self) -> "Traffic":
        if self.on_device is not None:
            counts = self.on_device.tolist()
            self.on_device.zero_()
            self.calls += counts[0]
            for i, phase in enumerate(PHASES):
                self.add(phase, counts[1 + i], counts[1 + len(PHASES) + i])
        return self

    def reset(self) -> None:
        self.calls = 0
        self.sent = dict.fromkeys(PHASES, 0)
        self.received = dict.fromkeys(PHASES, 0)
        if self.on_device is not None:
            self.on_device.zero_()

    def __iadd__(self, other: "Traffic") -> "Traffic":
        other.fold()
        self.calls += other.calls
        for phase in PHASES:
            self.add(phase, other.sent[phase], other.received[phase])
        return self

    def to_dict(self) -> dict:
        self.fold()
        return {"calls": self.calls, "sent": dict(self.sent), "received": dict(self.received),
                "sent_total": sum(self.sent.values()), "received_total": sum(self.received.values())}


def total_traffic(exchanges) -> Traffic:
    """The sum of the `traffic` of several exchanges (e.g. `ParallelContext.moe_exchange.values()`)."""
    total = Traffic()
    for ex in exchanges:
        total += ex.traffic
    return total


def reset_traffic(exchanges) -> None:
    for ex in exchanges:
        ex.traffic.reset()


@dataclass
class ExpertParallel:
    """Dispatch/combine for one MoE layer on one rank; call it with the routed pairs and the local experts."""

    layout: ExpertLayout
    ep_rank: int = 0
    ep_group: object = None
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: object = None
    scheme: str = "alltoall"
    traffic: Traffic = field(default_factory=Traffic)
    count_on_device: bool = False   # the padded form counts its traffic (device kernels in every step) when set

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ExpertParallelError(f"expert exchange scheme {self.scheme!r}: expected one of {SCHEMES}")
        if self.count_on_device:
            self.traffic.on_device = torch.zeros(1 + 2 * len(PHASES), dtype=torch.int64, device=self.layout.device)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, expert_fn: ExpertFn,
                 pair_fn: PairFn | None = None, padded: bool = False) -> torch.Tensor:
        """Routed-expert output for x [T, dim] with top-k `weights`/`indices` [T, k]; returns [T, dim] in x's dtype.

        `pair_fn`: run the received rows in one fixed-shape call instead of one `expert_fn` call per local
        expert. `padded`: the fixed-size all-to-all (needs `pair_fn`, and the same T on every rank of the group).
        """
        T = x.shape[0]
        share = -(-T // self.tp_size)  # rows each tensor-parallel rank takes into the exchange
        lo, hi = min(T, self.tp_rank * share), min(T, (self.tp_rank + 1) * share)
        x_mine, w_mine, i_mine = x[lo:hi], weights[lo:hi], indices[lo:hi]
        padded = padded and self.scheme == "alltoall" and self.layout.ep_size > 1
        if padded and pair_fn is None:
            raise ExpertParallelError("the padded all-to-all runs its experts through pair_fn; none was given")
        count = self.traffic.add_on_device if padded else self.traffic.add
        self.traffic.add_call(on_device=padded)
        if self.layout.ep_size == 1:
            slots = self.layout.choose_slots(i_mine, lo)
            rows = torch.arange(hi - lo, device=x.device).repeat_interleave(indices.shape[1])
            y = run_local(self.layout, 0, x_mine, slots.flatten(), w_mine.flatten(), rows, expert_fn)
        elif padded:
            y = self._alltoall_padded(x_mine, w_mine, i_mine, lo, share * indices.shape[1], pair_fn)
        elif self.scheme == "alltoall":
            y = self._alltoall(x_mine, w_mine, i_mine, lo, expert_fn, pair_fn)
        else:
            y = self._allgather(x_mine, w_mine, i_mine, expert_fn)
        y = y.to(x.dtype)
        if self.tp_size > 1:
            full = torch.zeros(share, x.shape[1], dtype=x.dtype, device=x.device)
            full[: hi - lo] = y
            parts = [torch.empty_like(full) for _ in range(self.tp_size)]
            dist.all_gather(parts, full, group=self.tp_group)
            nbytes = (self.tp_size - 1) * full.numel() * full.element_size()
            count("tp_gather", nbytes, nbytes)
            y = torch.cat(parts)[:T]
        return y

    def _alltoall_padded(self, x, weights, indices, offset, capacity, pair_fn):
        """All-to-all with `capacity` rows per destination, fixed shapes, no host sync (see the module doc)."""
        n, k = indices.shape
        ep, S, dim = self.layout.ep_size, self.layout.slots_per_rank, x.shape[1]
        slots = self.layout.choose_slots(indices, offset + self.ep_rank).flatten()      # [n*k], pair order
        dest = slots // S
        # each pair's place among the pairs bound for the same rank, in pair order
        place = ((dest[:, None] == torch.arange(ep, device=x.device)).long().cumsum(0) - 1).gather(1, dest[:, None])
        where = dest * capacity + place.squeeze(1)
        # slot + 1 (0 marks an unused row) and gate weight, fp32 (exact) and viewed as extra columns of x's dtype
        meta = torch.stack([slots.float() + 1, weights.flatten().float()], 1).view(x.dtype)
        send = x.new_zeros(ep * capacity, dim + meta.shape[1])
        send[where] = torch.cat([x.repeat_interleave(k, 0), meta], 1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        in_meta = recv[:, dim:].contiguous().view(torch.float32)
        used = in_meta[:, 0] > 0
        local = torch.where(used, in_meta[:, 0].long() - 1 - self.ep_rank * S, -1)
        out = pair_fn(recv[:, :dim].contiguous(), in_meta[:, 1].to(weights.dtype), local)
        back = torch.empty_like(out)
        dist.all_to_all_single(back, out.contiguous(), group=self.ep_group)
        y = back[where].float().view(n, k, dim).sum(1)
        if self.traffic.on_device is None:
            return y
        row = dim * x.element_size()
        sent_pairs = (dest != self.ep_rank).sum()
        # an integer row, not a boolean mask (a mask index reads its count on the host, which capture refuses)
        got_pairs = used.sum() - used.view(ep, capacity)[self.ep_rank].sum()
        wire = (ep - 1) * capacity
        t = self.traffic
        t.add_on_device("dispatch", sent_pairs * row, got_pairs * row)
        t.add_on_device("meta", wire * meta.shape[1] * x.element_size(), wire * meta.shape[1] * x.element_size())
        t.add_on_device("combine", got_pairs * row, sent_pairs * row)
        unused = (2 * wire - sent_pairs - got_pairs) * row
        t.add_on_device("padding", unused, unused)
        return y

    def _alltoall(self, x, weights, indices, offset, expert_fn, pair_fn=None):
        k, ep, S = indices.shape[1], self.layout.ep_size, self.layout.slots_per_rank
        slots = self.layout.choose_slots(indices, offset + self.ep_rank).flatten()
        order = torch.argsort(slots // S, stable=True)           # pairs grouped by destination rank
        rows = order // k
        send_counts = torch.bincount(slots // S, minlength=ep)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # fp32 on every backend: exact for slot ids and gate weights
        meta = torch.stack([slots[order].float(), weights.flatten()[order].float()], 1)
        in_x = x.new_empty(sum(recv), x.shape[1])
        in_meta = meta.new_empty(sum(recv), 2)
        dist.all_to_all_single(in_x, x[rows].contiguous(), recv, send, group=self.ep_group)
        dist.all_to_all_single(in_meta, meta, recv, send, group=self.ep_group)
        if pair_fn is not None:
            out = pair_fn(in_x, in_meta[:, 1].to(weights.dtype), in_meta[:, 0].long() - self.ep_rank * S)
        else:
            pair = torch.arange(in_x.shape[0], device=x.device)
            out = run_local(self.layout, self.ep_rank, in_x, in_meta[:, 0].long(), in_meta[:, 1].to(weights.dtype),
                            pair, expert_fn)
        # one row per pair, each an expert output in x's dtype: sending it back in that dtype is exact
        back = x.new_empty(len(order), x.shape[1])
        dist.all_to_all_single(back, out.to(x.dtype), send, recv, group=self.ep_group)
        out_rows, in_rows = sum(send) - send[self.ep_rank], sum(recv) - recv[self.ep_rank]
        row = x.shape[1] * x.element_size()
        t = self.traffic
        t.add("counts", (ep - 1) * send_counts.element_size(), (ep - 1) * send_counts.element_size())
        t.add("dispatch", out_rows * row, in_rows * row)
        t.add("meta", out_rows * 2 * meta.element_size(), in_rows * 2 * meta.element_size())
        t.add("combine", in_rows * row, out_rows * row)
        return torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device).index_add_(
            0, rows, back.float())

    def _allgather(self, x, weights, indices, expert_fn):
        ep, n = self.layout.ep_size, x.shape[0]
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(ep)]
        sizes_bytes = sizes[0].element_size()
        dist.all_gather(sizes, torch.tensor([n], device=x.device), group=self.ep_group)
        sizes = [int(s) for s in sizes]
        width = max(sizes)
        self.traffic.add("counts", (ep - 1) * sizes_bytes, (ep - 1) * sizes_bytes)

        def gather(t: torch.Tensor, phase: str) -> list[torch.Tensor]:
            padded = t.new_zeros(width, *t.shape[1:])
            padded[:n] = t
            parts = [torch.empty_like(padded) for _ in range(ep)]
            dist.all_gather(parts, padded, group=self.ep_group)
            nbytes = (ep - 1) * padded.numel() * padded.element_size()
            self.traffic.add(phase, nbytes, nbytes)
            return parts

        xs, ws, ids = gather(x, "dispatch"), gather(weights, "meta"), gather(indices, "meta")
        # every rank must pick the same replica for a pair, so the choice depends on the owner only
        slots = torch.cat([self.layout.choose_slots(ids[r], r * width) for r in range(ep)])
        rows = torch.arange(ep * width, device=x.device).repeat_interleave(indices.shape[1])
        valid = (torch.arange(width, device=x.device) < torch.tensor(sizes, device=x.device)[:, None]).flatten()
        valid = valid.repeat_interleave(indices.shape[1])
        slots = torch.where(valid, slots.flatten(), -1)
        partial = run_local(self.layout, self.ep_rank, torch.cat(xs), slots, torch.cat(ws).flatten(), rows, expert_fn)
        if dist.get_backend(self.ep_group) == "gloo":  # gloo has no reduce_scatter
            dist.all_reduce(partial, group=self.ep_group)
            mine = partial[self.ep_rank * width:(self.ep_rank + 1) * width]
        else:
            mine = partial.new_empty(width, x.shape[1])
            dist.reduce_scatter_tensor(mine, partial, group=self.ep_group)
        nbytes = (ep - 1) * width * x.shape[1] * partial.element_size()  # the reduce-scatter's payload
        self.traffic.add("combine", nbytes, nbytes)
        return mine[:n]

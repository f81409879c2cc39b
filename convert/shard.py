"""Which part of each tensor each rank gets.

Tensor parallelism generalises the official converter: with tp ranks per replica (tp_rank = rank % tp),
`embed`, `head`, `wq_b` (attention and indexer, with their scales), `wo_a`, `attn_sink` and
`weights_proj` are split along dim 0, `wo_b` along dim 1, and everything else is replicated. A split
of a block-quantised weight must fall on whole scale blocks, so its scale splits with it.

Routed experts follow the plan's placement: rank r holds, for each MoE layer, the logical experts of
its physical slots (`plan.experts_on_rank(layer, r)`). A redundant replica is written to every rank
that holds one. Expert tensors keep their official names, `layers.L.ffn.experts.E.*` with E the
logical expert id, as model/moe.py names its modules (one module per distinct expert on the rank;
which local slots it serves comes from the plan, recorded in the manifest). Two slots of one rank
holding the same expert therefore share one stored copy. The shared expert and all other tensors
are on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convert.errors import ConvertError
from convert.layout import FP8_BLOCK, TensorSpec
from model.config import ModelConfig


@dataclass(frozen=True)
class Piece:
    """One output tensor of one rank: its name and, for a TP split, the slice of the source it holds."""
    name: str
    split: tuple[int, int, int] | None  # (dim, start, stop) of the source tensor, None = whole


@dataclass(frozen=True)
class Sharding:
    """The per-rank view of a plan that conversion needs."""
    world_size: int
    tp: int
    slots: tuple[tuple[tuple[int, ...], ...], ...]  # slots[layer][rank] = logical expert per local slot

    @classmethod
    def from_plan(cls, plan, cfg: ModelConfig, origin: str = "plan") -> "Sharding":
        world, tp = int(plan.world_size), int(plan.tp)
        n_moe = cfg.n_layers + cfg.n_mtp_layers
        for field, want in (("n_routed_experts", cfg.n_routed_experts), ("n_layers", cfg.n_layers),
                            ("n_mtp_layers", cfg.n_mtp_layers)):
            got = getattr(plan, field, want)
            if got != want:
                raise ConvertError(f"{origin}: plan is for {field} = {got}, the checkpoint has {want}")
        _check_tp(cfg, tp, origin)
        slots = []
        for layer in range(n_moe):
            per_rank = tuple(tuple(int(e) for e in plan.experts_on_rank(layer, r)) for r in range(world))
            held = {e for rank in per_rank for e in rank}
            if any(not 0 <= e < cfg.n_routed_experts for e in held) or len(held) != cfg.n_routed_experts:
                raise ConvertError(f"{origin}: MoE layer {layer} places experts {min(held)}..{max(held)} "
                                   f"({len(held)} distinct), expected all {cfg.n_routed_experts} experts of the "
                                   f"checkpoint")
            slots.append(per_rank)
        return cls(world, tp, tuple(slots))

    def local_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """Shape of every rank's piece of `spec` (experts and replicated tensors keep theirs)."""
        if spec.expert is not None or spec.split_dim is None:
            return spec.shape
        shape = list(spec.shape)
        shape[spec.split_dim] //= self.tp
        return tuple(shape)

    def pieces(self, spec: TensorSpec, rank: int) -> list[Piece]:
        """The output tensors rank `rank` holds of source tensor `spec` (empty: none)."""
        if spec.expert is not None:
            return [Piece(spec.name, None)] if spec.expert in self.slots[spec.layer][rank] else []
        if spec.split_dim is None or self.tp == 1:
            return [Piece(spec.name, None)]
        size = spec.shape[spec.split_dim] // self.tp
        t = rank % self.tp
        return [Piece(spec.name, (spec.split_dim, t * size, (t + 1) * size))]


def _check_tp(cfg: ModelConfig, tp: int, origin: str) -> None:
    """Every TP-split dimension must divide evenly, on whole quantisation blocks (`ModelConfig.tp_split_problem`)."""
    problem = cfg.tp_split_problem(tp)
    if problem:
        raise ConvertError(f"{origin}: {problem} of the checkpoint")


def scale_split(split: tuple[int, int, int] | None, scale: TensorSpec) -> tuple[int, int, int] | None:
    """The slice of a weight's scale that goes with slice `split` of the weight."""
    if split is None or scale.split_dim is None:
        return None  # unsplit, or an int8 [out] scale of a column split: every rank needs all rows
    dim, start, stop = split
    if scale.quant == "fp8_scale":
        return dim, start // FP8_BLOCK, stop // FP8_BLOCK
    return split


def cut(weight: torch.Tensor, scale: torch.Tensor | None, scale_spec: TensorSpec | None,
        split: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slice `split` (dim, start, stop) of a weight and the matching slice of its scale (views; None: whole)."""
    if split is None:
        return weight, scale
    dim, a, b = split
    ss = scale_split(split, scale_spec) if scale_spec is not None else None
    if ss is not None:
        scale = scale.narrow(ss[0], ss[1], ss[2] - ss[1])
    return weight.narrow(dim, a, b - a), scale

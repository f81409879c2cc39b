"""Mixture of experts: the router (`Gate`), SwiGLU experts and the expert-parallel `MoE` layer.

Routing (kernels.gate_topk): score = sqrt(softplus(x W^T)) in float32. Hash layers (the first n_hash_layers)
take their experts from the fixed table `tid2eid[token id]`; the others take the top-k of score + `bias`, where the
bias only chooses and never weights. The chosen scores are normalised to sum 1 and scaled by route_scale.

Expert parallelism: this rank holds the experts of its physical slots (`ParallelContext.expert_slots`), names them
by logical id (`experts.<id>.w1.weight`, as in the checkpoint), computes the token-expert pairs its slots own and
sums the partial outputs over the ep group; the shared expert is replicated and added after the sum. This assumes
every rank of the ep group sees the same tokens. A dispatch / combine exchange (all-to-all) replaces that
all-reduce when `ParallelContext.moe_exchange` has one for the layer; it calls back `MoE.run_expert`.

Two ways to run the routed experts, same result:
- dynamic (`routed`): per local expert, gather the tokens that chose it. Reads each chosen expert once, but the
  row counts depend on the data (a host sync per layer), so it cannot be graph-captured. Used for big prefills.
- static (`routed_static`): one row per (token, choice) selection, N = tokens x topk; `kernels.expert_matmul`
  multiplies each row by its expert's stored weights (fp4 / fp8 / int8 / bf16 + scales), picked by index (the
  reference gathers and dequantises them; the CUDA backend reads the FP4 / FP8 bytes in-kernel). Fixed shapes and no
  host sync, so a decode step captures whole (CUDA graph / NPUGraph, torch.compile).
  Selections owned by another rank (or another replica) get expert row -1, which `expert_matmul` turns into
  zeros (a fused kernel skips their work), before the same all-reduce. `run_pairs` is the same computation on
  rows an exchange brought in, named by local slot.
  To gather by index the local experts' tensors live stacked ([n_local, ...] per tensor); each
  `experts.<id>.wN.weight` parameter is a view of its row, so names, shapes and loading are unchanged.
`MoE.mode` picks: "auto" (static while capturing / compiling, when tokens x topk <= `STATIC_MAX_SELECTIONS`, or at
any size when the kernel table groups the experts' format, `Kernels.grouped_expert_formats`: the CUDA backend's FP4 /
FP8, the NPU backend's bf16 / int8 on A2/A3), "static" or "dynamic"; `set_moe_mode(model, mode)` sets every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ascend.errors import AscendDeployError
from model.config import ModelConfig
from model.kernels import REFERENCE, Kernels
from model.linear import JointRows, Linear, can_share_rows, share_rows
from model.parallel import ParallelContext

__all__ = ["MoEError", "Gate", "Expert", "MoE", "MOE_MODES", "STATIC_MAX_SELECTIONS", "set_moe_mode"]

MOE_MODES = ("auto", "static", "dynamic")
STATIC_MAX_SELECTIONS = 256
"""auto mode runs the static path up to this many selections (tokens x topk): decode batches up to ~40 tokens.
Beyond it the reference's per-selection weight copies (N x expert size, dequantised) cost more than the dynamic
path's sync. Formats the kernel table groups (`Kernels.grouped_expert_formats`) run static at any size."""
STATIC_SLICE_TOKENS = 4096
"""The static path takes a long input this many tokens at a time: its working set is tokens x topk rows of dim
and inter values (~0.8 GB per slice at V4-Flash width), not a whole prompt's."""


class MoEError(AscendDeployError):
    """An unknown MoE execution mode."""


def _capturing() -> bool:
    """Inside torch.compile tracing or a CUDA / NPU graph capture on the current stream."""
    if torch.compiler.is_compiling():
        return True
    for runtime in (torch.cuda, getattr(torch, "npu", None)):
        check = getattr(runtime, "is_current_stream_capturing", None)
        if check is not None and runtime.is_available() and check():
            return True
    return False


class Gate(nn.Module):
    """Router of one MoE layer: `weight` [E, dim] (bf16), plus `tid2eid` [vocab, k] (hash) or `bias` [E] (fp32)."""

    def __init__(self, layer_id: int, config: ModelConfig, kernels: Kernels = REFERENCE):
        super().__init__()
        self.topk, self.route_scale, self.kernels = config.n_activated_experts, config.route_scale, kernels
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim, dtype=torch.bfloat16),
                                   requires_grad=False)
        if config.is_hash_layer(layer_id):
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.topk, dtype=torch.int64))
            self.bias = None
        else:
            self.tid2eid = None
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim], input_ids [N] -> (weights float32 [N, k], expert ids int64 [N, k])."""
        logits = self.kernels.f32_linear(x, self.weight)
        return self.kernels.gate_topk(logits, self.bias, self.tid2eid, input_ids, self.topk, self.route_scale)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up in float32, gate clamped to <= limit and up to [-limit, limit] when limit > 0."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


class Expert(JointRows):
    """SwiGLU FFN: w2(silu(w1 x) * (w3 x)), gate clamped to <= limit and up to [-limit, limit] when limit > 0; its
    three projections stored in one format `fmt`. `joint`: w1 and w3 share one tensor and one call (`JointRows`;
    the shared expert; routed experts are stacked by their `MoE` instead)."""

    joint_names = ("w1", "w3")

    def __init__(self, dim: int, inter_dim: int, fmt: str, swiglu_limit: float = 0.0, joint: bool = False):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fmt)   # gate
        self.w2 = Linear(inter_dim, dim, fmt)   # down
        self.w3 = Linear(dim, inter_dim, fmt)   # up
        self.swiglu_limit = swiglu_limit
        self.rows_shared = joint
        self.join_rows(copy=False)

    @property
    def fmt(self) -> str:
        return self.w1.fmt

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, dim]; weights [N, 1] (routing weight, applied before w2) or None."""
        gate, up = self.joint(x)
        h = swiglu(gate, up, self.swiglu_limit)
        if weights is not None:
            h = h * weights
        return self.w2(h.to(x.dtype))


class MoE(nn.Module):
    """Routed experts held on this rank + one shared expert; input and output [B, S, dim]."""

    def __init__(self, layer_id: int, config: ModelConfig, parallel: ParallelContext | None = None,
                 kernels: Kernels = REFERENCE):
        super().__init__()
        self.parallel = parallel or ParallelContext()
        self.layer_id = layer_id
        self.mode = "auto"
        self.kernels = kernels
        self.gate = Gate(layer_id, config, kernels)
        self.slots = self.parallel.expert_slots(layer_id, config.n_routed_experts)
        local = sorted(set(self.slots.experts))
        self.experts = nn.ModuleDict({
            str(e): Expert(config.dim, config.moe_inter_dim, config.expert_dtype, config.swiglu_limit)
            for e in local})
        # the official model clamps the shared expert with the same limit as the routed ones
        self.shared_experts = Expert(config.dim, config.moe_inter_dim, config.dtype, config.swiglu_limit, joint=True)
        # static path tables: selection (token t, expert e) -> local stack row local_row[e, t % n_replicas[e]]
        n_replicas = [1] * config.n_routed_experts
        for e, n in zip(self.slots.experts, self.slots.n_replicas):
            n_replicas[e] = n
        local_row = [[-1] * max(n_replicas) for _ in n_replicas]
        for e, replica in zip(self.slots.experts, self.slots.replica):
            local_row[e][replica] = local.index(e)
        self.register_buffer("n_replicas", torch.tensor(n_replicas), persistent=False)
        self.register_buffer("local_row", torch.tensor(local_row), persistent=False)
        self.register_buffer("slot_row", torch.tensor([local.index(e) for e in self.slots.experts]), persistent=False)
        self._stack_experts(copy=False)

    # ------------------------------------------------------------------------------------------ stacked storage
    def _stack_experts(self, copy: bool = True) -> None:
        """Make every routed expert tensor a view of one [n_local, ...] stack per tensor name (`w2.weight`, ...),
        w1 and w3 (same input) as the two row halves of one stack (`w13.weight`, ...) so that one launch computes
        both, where they can share (`can_share_rows`)."""
        first = self._probe()
        joint = can_share_rows([first.w1, first.w3])
        stacks = {"w13": ("w1", "w3"), "w2": ("w2",)} if joint else {p: (p,) for p in ("w1", "w2", "w3")}
        self._stacks: dict[str, torch.Tensor] = {}
        for name, projs in stacks.items():
            for kind, _ in first.w1.named_parameters():
                parts = [[e.get_parameter(f"{p}.{kind}") for e in self.experts.values()] for p in projs]
                self._stacks[f"{name}.{kind}"] = share_rows(parts, copy)

    def _apply(self, fn, recurse=True):
        """`.to()` / `.cuda()` replace each parameter's tensor: stack the moved experts again."""
        out = super()._apply(fn, recurse)
        self._stack_experts()
        return out

    def use_static(self, n_selections: int) -> bool:
        if self.mode not in MOE_MODES:
            raise MoEError(f"MoE.mode = {self.mode!r}: expected one of {MOE_MODES}")
        if self.mode != "auto":
            return self.mode == "static"
        return (n_selections <= STATIC_MAX_SELECTIONS or _capturing()
                or self._probe().fmt in self.kernels.grouped_expert_formats)

    def _probe(self) -> Expert:
        """One local expert: they all share their format, roundings and SwiGLU limit."""
        return next(iter(self.experts.values()))

    # ------------------------------------------------------------------------------------------ routed experts
    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of sum_k weights[:, k] * expert_{indices[:, k]}(x), float32 [N, dim] (dynamic shapes).

        A pair (token t, expert e) belongs to the local slot holding replica t % n_replicas(e) of e, so over the ep
        group every pair is computed exactly once.
        """
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        token = torch.arange(x.size(0), device=x.device)
        counts = torch.bincount(indices.flatten(), minlength=len(self.gate.weight)).tolist()
        for e, replica, n_replicas in zip(*(self.slots.experts, self.slots.replica, self.slots.n_replicas)):
            if counts[e] == 0:
                continue
            mine = indices == e
            if n_replicas > 1:
                mine &= (token % n_replicas == replica).unsqueeze(1)
            rows, k = torch.where(mine)
            if rows.numel():
                y.index_add_(0, rows, self.experts[str(e)](x[rows], weights[rows, k, None]).float())
        return y

    def _project(self, name: str, xs: torch.Tensor, rows: torch.Tensor, groups: tuple | None) -> torch.Tensor:
        """Projection `name` (w13 / w1 / w2 / w3) of the expert in stack row rows[i] applied to xs[i]: [M, out]."""
        return self.kernels.expert_matmul(xs, self._stacks[f"{name}.weight"], self._stacks.get(f"{name}.scale"),
                                          self._probe().fmt, rows, groups)

    def _selections(self, xs: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """weights[i] * expert in stack row rows[i] (xs[i]), [M, dim] in xs' dtype; rows[i] = -1 gives zeros."""
        probe = self._probe()
        groups = self.kernels.group_experts(rows, len(self.experts), probe.fmt)    # one grouping for every call
        xs = probe.w1.round_input(xs)
        if "w13.weight" in self._stacks:
            gate, up = self._project("w13", xs, rows, groups).split(probe.w1.out_features, dim=-1)
        else:
            gate, up = self._project("w1", xs, rows, groups), self._project("w3", xs, rows, groups)
        h = swiglu(gate, up, probe.swiglu_limit)
        h = probe.w2.round_input((h * weights.reshape(-1, 1)).to(xs.dtype))
        return self._project("w2", h, rows, groups)

    def routed_static(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Same as `routed` with shapes fixed by x and k: one gathered expert per (token, choice) selection, in
        slices of STATIC_SLICE_TOKENS tokens (one slice at decode)."""
        n, k = indices.shape
        token = torch.arange(n, device=x.device).unsqueeze(1)
        rows = self.local_row[indices, token % self.n_replicas[indices]]   # [n, k], -1: not ours (zeros)
        parts = []
        for at in range(0, n, STATIC_SLICE_TOKENS):
            xt = x[at:at + STATIC_SLICE_TOKENS]
            m = xt.size(0)
            xs = xt.unsqueeze(1).expand(m, k, x.size(-1)).reshape(m * k, x.size(-1))
            sel = self._selections(xs, weights[at:at + m], rows[at:at + m].flatten())
            parts.append(sel.float().view(m, k, -1).sum(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def run_expert(self, expert: int, rows: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """Local expert `expert` on rows [n, dim] with routing weights [n] (the exchange callback)."""
        return self.experts[str(expert)](rows, row_weights.float().unsqueeze(-1))

    def run_pairs(self, rows: torch.Tensor, row_weights: torch.Tensor, local_slots: torch.Tensor) -> torch.Tensor:
        """The local slot's expert on each row, weighted, in one fixed-shape call; slot -1 gives zeros (the
        exchange's static callback)."""
        stack_rows = torch.where(local_slots >= 0, self.slot_row[local_slots.clamp(min=0)], -1)
        return self._selections(rows, row_weights, stack_rows)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, input_ids.reshape(-1))
        exchange = self.parallel.moe_exchange.get(self.layer_id)
        if exchange is not None:
            # static: the received rows in one call; fixed (a graph being captured, or static forced): the
            # padded all-to-all, whose shapes do not depend on the routing
            static = self.use_static(indices.numel())
            fixed = self.mode == "static" or _capturing()
            y = exchange(x, weights, indices, self.run_expert, self.run_pairs if static else None, fixed).float()
        else:
            routed = self.routed_static if self.use_static(indices.numel()) else self.routed
            y = self.parallel.all_reduce_ep(routed(x, weights, indices))
        y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)


def set_moe_mode(model: nn.Module, mode: str) -> None:
    """Set `MoE.mode` ("auto" | "static" | "dynamic") in every MoE layer of `model`."""
    if mode not in MOE_MODES:
        raise MoEError(f"MoE mode {mode!r}: expected one of {MOE_MODES}")
    for module in model.modules():
        if isinstance(module, MoE):
            module.mode = mode

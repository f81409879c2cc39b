"""Mixture of experts: the router (`Gate`), SwiGLU experts and the expert-parallel `MoE` layer.

Routing (kernels.gate_topk): score = sqrt(softplus(x W^T)) in float32. Hash layers (the first n_hash_layers)
take their experts from the fixed table `tid2eid[token id]`; the others take the top-k of score + `bias`, where the
bias only chooses and never weights. The chosen scores are normalised to sum 1 and scaled by route_scale.

Expert parallelism: this rank holds the experts of its physical slots (`ParallelContext.expert_slots`), names them
by logical id (`experts.<id>.w1.weight`, as in the checkpoint), computes the token-expert pairs its slots own and
sums the partial outputs over the ep group; the shared expert is replicated and added after the sum. This assumes
every rank of the ep group sees the same tokens. A dispatch / combine exchange (all-to-all) replaces that
all-reduce when `ParallelContext.moe_exchange` has one for the layer; it calls back `MoE.run_expert`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kernels import REFERENCE, Kernels
from model.linear import Linear
from model.parallel import ParallelContext

__all__ = ["Gate", "Expert", "MoE"]


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
        logits = F.linear(x.float(), self.weight.float())
        return self.kernels.gate_topk(logits, self.bias, self.tid2eid, input_ids, self.topk, self.route_scale)


class Expert(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * (w3 x)), gate clamped to <= limit and up to [-limit, limit] when limit > 0."""

    def __init__(self, dim: int, inter_dim: int, fmt: str, swiglu_limit: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fmt)   # gate
        self.w2 = Linear(inter_dim, dim, fmt)   # down
        self.w3 = Linear(dim, inter_dim, fmt)   # up
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, dim]; weights [N, 1] (routing weight, applied before w2) or None."""
        gate, up = self.w1(x).float(), self.w3(x).float()
        if self.swiglu_limit > 0:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
        h = F.silu(gate) * up
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
        self.gate = Gate(layer_id, config, kernels)
        self.slots = self.parallel.expert_slots(layer_id, config.n_routed_experts)
        self.experts = nn.ModuleDict({
            str(e): Expert(config.dim, config.moe_inter_dim, config.expert_dtype, config.swiglu_limit)
            for e in sorted(set(self.slots.experts))})
        # the official model clamps the shared expert with the same limit as the routed ones
        self.shared_experts = Expert(config.dim, config.moe_inter_dim, config.dtype, config.swiglu_limit)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of sum_k weights[:, k] * expert_{indices[:, k]}(x), float32 [N, dim].

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

    def run_expert(self, expert: int, rows: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """Local expert `expert` on rows [n, dim] with routing weights [n] (the exchange callback)."""
        return self.experts[str(expert)](rows, row_weights.float().unsqueeze(-1))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, input_ids.reshape(-1))
        exchange = self.parallel.moe_exchange.get(self.layer_id)
        if exchange is not None:
            y = exchange(x, weights, indices, self.run_expert).float()
        else:
            y = self.parallel.all_reduce_ep(self.routed(x, weights, indices))
        y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)

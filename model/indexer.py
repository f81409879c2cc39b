"""Lightning indexer of DeepSeek-V4 CSA layers: picks, per query, a fixed number of compressed entries to attend.

Queries come from the attention's low-rank query `qr`: q = wq_b(qr) as index_n_heads x index_head_dim, RoPE on
the last rope dims, Hadamard rotation, FP4 simulation. Keys are the indexer compressor's entries (same pooling as
the main compressor, index_head_dim wide, Hadamard + FP4). Per query i and entry t:
    score[i, t] = sum_h w[i, h] * relu(q[i, h] . k[t]),   w = weights_proj(x) * index_head_dim^-0.5 * n_heads^-0.5
summed over tensor-parallel ranks (each holds n_heads / tp heads); entry t is visible iff t < (i + 1) // ratio
(its block ended at or before i). The top `index_topk` visible entries are kept, -1 padding the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from model import kernels as K
from model.compressor import Compressor
from model.config import ModelConfig
from model.linear import ColumnParallelLinear
from model.parallel import ParallelContext

__all__ = ["Indexer"]


class Indexer(nn.Module):
    """`attn.indexer`: wq_b, weights_proj and its own compressor (ratio 4, Hadamard-rotated keys)."""

    def __init__(self, config: ModelConfig, ratio: int, parallel: ParallelContext | None = None,
                 kernels: K.Kernels = K.REFERENCE):
        super().__init__()
        self.parallel = parallel or ParallelContext()
        self.ratio, self.topk, self.head_dim = ratio, config.index_topk, config.index_head_dim
        self.n_local_heads = self.parallel.split(config.index_n_heads, "index_n_heads")
        self.weight_scale = config.index_head_dim ** -0.5 * config.index_n_heads ** -0.5
        self.kernels, self.quant_sim = kernels, config.quant_sim
        self.wq_b = ColumnParallelLinear(config.q_lora_rank, config.index_n_heads * config.index_head_dim,
                                         config.dtype, self.parallel)
        self.weights_proj = ColumnParallelLinear(config.dim, config.index_n_heads, "bf16", self.parallel)
        self.compressor = Compressor(config, ratio, config.index_head_dim, rotate=True, kernels=kernels)

    def queries(self, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, S, q_lora_rank] -> rotated, Hadamard-mixed, FP4-simulated queries [B, S, local heads, head_dim]."""
        return self.rotate_queries(self.project_queries(qr), cos, sin)

    def project_queries(self, qr: torch.Tensor) -> torch.Tensor:
        """The queries' projection wq_b: [B, S, q_lora_rank] -> [B, S, local heads, head_dim] (apart from their
        rotation so that a decode schedule can order the attention's own wq_b after it where the selection is one
        operator: ascend.backends.streams)."""
        return self.wq_b(qr).unflatten(-1, (self.n_local_heads, self.head_dim))

    def rotate_queries(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE, Hadamard and FP4 simulation of projected queries (`project_queries`)."""
        return K.rotate_index(self.kernels, q, cos, sin, self.quant_sim)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head weights of the scores, float32 [B, S, local heads]."""
        return self.weights_proj(x).float() * self.weight_scale

    def forward(self, q: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                keys: torch.Tensor) -> torch.Tensor:
        """Top-k entry ids int32 [B, S, index_topk] (-1 = none) for `queries` q and `weights` of the queries at
        `positions` [B, S].

        keys: [B, T, head_dim] the indexer cache (entries of this chunk already written); rows >= the visible count
        are never selected.
        """
        return self.kernels.indexer_topk(q, keys, weights, self._visible(positions), self.topk, self._group())

    @property
    def splits(self) -> bool:
        """Whether the kernels table computes the selection as scores, then a top-k of them
        (`Kernels.indexer_scores`): then `forward` is `select(scores(...))` and a decode schedule may run other
        work between the two (ascend.backends.streams)."""
        return self.kernels.indexer_scores is not None

    def scores(self, q: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """`forward`'s scores where the table splits it (`splits`): float32 [B, S, T], summed over the
        tensor-parallel ranks, -inf for entries not visible."""
        return K.sum_scores(self.kernels.indexer_scores(q, keys, weights, self._visible(positions)), self._group())

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """`forward`'s selection from `scores`: top-k entry ids int32 [B, S, index_topk] (-1 = none)."""
        return self.kernels.select_topk(scores, self.topk)

    def _visible(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions + 1) // self.ratio

    def _group(self):
        return self.parallel.tp_group if self.parallel.tp_size > 1 else None

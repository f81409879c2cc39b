"""Manifold-constrained hyper-connections (mHC): the residual stream widened to `hc_mult` parallel streams.

The embedding is copied into n streams X [B, S, n, dim]. Around every sub-block F (attention, then MoE):

    y, post, comb = hc_pre(X)          y = sum_k pre_k X_k, weights from (vec X . fn^T) / RMS(vec X)
    X' = hc_post(F(y), X, post, comb)  X'_j = post_j F(y) + sum_k comb[k, j] X_k, comb ~ doubly stochastic

and before the output norm `hc_head` reduces the streams with sigmoid weights (no Sinkhorn). The maths lives in
`kernels.hc_pre / hc_post / hc_head / sinkhorn`; this module holds the parameters under their checkpoint names
(`hc_attn_fn`, `hc_attn_base`, `hc_attn_scale`, ... all float32) and the call sequence.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model.config import ModelConfig
from model.kernels import Kernels

__all__ = ["expand_streams", "HyperConnection", "HyperHead"]


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, dim] -> [B, S, n, dim]: every stream starts as a copy of the embedding."""
    return h.unsqueeze(2).repeat(1, 1, n, 1)


def _fp32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32), requires_grad=False)


class HyperConnection:
    """mHC around one named sub-block of `owner`, whose parameters are `hc_<name>_{fn,base,scale}`.

    A plain helper (not a Module) so the parameters stay flat on the block, as the checkpoint names them. The owner
    is passed to each call, not kept: the owner holds the helper, and a helper holding the owner back would make a
    reference cycle that keeps a dropped model's device memory until Python's cycle collector happens to run.
    """

    def __init__(self, owner: nn.Module, name: str, config: ModelConfig, kernels: Kernels):
        n, mix = config.hc_mult, config.n_hc_mix
        owner.register_parameter(f"hc_{name}_fn", _fp32(mix, n * config.dim))
        owner.register_parameter(f"hc_{name}_base", _fp32(mix))
        owner.register_parameter(f"hc_{name}_scale", _fp32(3))
        self.prefix, self.kernels = f"hc_{name}_", kernels
        self.iters, self.eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.norm_eps

    def __call__(self, owner: nn.Module, streams: torch.Tensor,
                 sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Streams [B, S, n, dim] -> streams after `sublayer` ([B, S, dim] -> [B, S, dim]) with mHC mixing."""
        fn, scale, base = (getattr(owner, self.prefix + what) for what in ("fn", "scale", "base"))
        y, post, comb = self.kernels.hc_pre(streams, fn, scale, base, self.iters, self.eps, self.norm_eps)
        return self.kernels.hc_post(sublayer(y), streams, post, comb)


class HyperHead:
    """The stream reduction before the output norm: parameters `hc_head_{fn,base,scale}` on `owner` (passed to each
    call, as for HyperConnection)."""

    def __init__(self, owner: nn.Module, config: ModelConfig, kernels: Kernels):
        n = config.hc_mult
        owner.register_parameter("hc_head_fn", _fp32(n, n * config.dim))
        owner.register_parameter("hc_head_base", _fp32(n))
        owner.register_parameter("hc_head_scale", _fp32(1))
        self.kernels, self.eps, self.norm_eps = kernels, config.hc_eps, config.norm_eps

    def __call__(self, owner: nn.Module, streams: torch.Tensor) -> torch.Tensor:
        """[B, S, n, dim] -> [B, S, dim]."""
        return self.kernels.hc_head(streams, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base, self.eps,
                                    self.norm_eps)

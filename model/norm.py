"""`RMSNorm`: the weighted RMS norm used throughout V4 (attention q/kv norms, compressors, block norms, heads)."""

from __future__ import annotations

import torch
from torch import nn

from model import kernels as K

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed by `kernels.rms_norm` (float32 math, x's dtype out).

    The checkpoint stores `weight` in BF16; it is held in float32 (loading casts), as the official model does.
    """

    def __init__(self, dim: int, eps: float = 1e-6, kernels: K.Kernels = K.REFERENCE):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

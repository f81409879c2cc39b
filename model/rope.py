"""Rotary position embedding tables for DeepSeek-V4 attention.

Every layer rotates the last `rope_head_dim` (64) dims of its queries, keys, compressed entries and indexer
vectors, interleaved pairs (2k, 2k+1). Layers that compress (ratio 4 or 128) use YaRN-scaled frequencies with base
`compress_rope_theta`; window-only layers (ratio 0, the MTP layer) use plain RoPE with base `rope_theta`.

Instead of a [max_seq_len, 32] table (256 MiB of complex numbers at 1M tokens) a layer keeps its 32 frequencies
and evaluates cos / sin at the positions it needs. The angle is the same float32 product position * frequency a
precomputed table would hold, so the result is bit-identical and the shapes stay static.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig

__all__ = ["rope_frequencies", "layer_frequencies", "Rotary"]


def _yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                           original_seq_len: int) -> tuple[int, int]:
    """Dim-pair band over which YaRN blends interpolated and original frequencies.

    A pair's frequency completes `n` rotations over the original context at pair index
    dim * log(L / (2 pi n)) / (2 log base); the band runs from the pair doing `beta_fast` rotations (floored) to the
    one doing `beta_slow` (ceiled), clipped to [0, dim - 1].
    """
    def pair_for(rotations: float) -> float:
        return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(pair_for(beta_fast))
    high = math.ceil(pair_for(beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(rope_dim: int, base: float, original_seq_len: int = 0, factor: float = 1.0,
                     beta_fast: float = 32, beta_slow: float = 1) -> torch.Tensor:
    """Float32 [rope_dim / 2] angular frequency of each interleaved pair; YaRN when original_seq_len > 0.

    Plain: f_k = base^(-2k / rope_dim). YaRN: pairs below the correction band (high frequency, many rotations)
    keep f_k, pairs above it use f_k / factor, and a linear ramp over the band blends the two.
    """
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if original_seq_len > 0:
        low, high = _yarn_correction_range(beta_fast, beta_slow, rope_dim, base, original_seq_len)
        if low == high:
            high += 0.001                      # avoid a zero-width ramp
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp                        # 1 = original frequency, 0 = interpolated
        freqs = freqs / factor * (1 - keep) + freqs * keep
    return freqs


def layer_frequencies(config: ModelConfig, layer_id: int) -> torch.Tensor:
    """The RoPE frequencies layer `layer_id` uses (YaRN + compress_rope_theta iff it compresses)."""
    if config.compress_ratio(layer_id) > 0:
        return rope_frequencies(config.rope_head_dim, config.compress_rope_theta, config.original_seq_len,
                                config.rope_factor, config.beta_fast, config.beta_slow)
    return rope_frequencies(config.rope_head_dim, config.rope_theta)


class Rotary(nn.Module):
    """One layer's RoPE: `rotary(positions)` -> (cos, sin), each float32 [*positions.shape, rope_dim / 2].

    The result feeds `kernels.rope(x, cos, sin, inverse)`. Positions are absolute token positions (int tensor);
    compressed entry j is rotated at position j * ratio, the first token of its block.
    """

    def __init__(self, freqs: torch.Tensor):
        super().__init__()
        self.register_buffer("freqs", freqs.float(), persistent=False)

    @classmethod
    def for_layer(cls, config: ModelConfig, layer_id: int) -> "Rotary":
        return cls(layer_frequencies(config, layer_id))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.freqs
        return angles.cos(), angles.sin()

"""Output formats: `keep` (as published), `bf16` (dequantised), `int8` (per-output-channel W8 + float32 scale).

Only the quantised projections change format (attention, shared and routed experts, MTP projections:
the tensors whose storage format config.json names through `dtype` / `expert_dtype`); norms, gates,
embeddings, hyper-connection parameters and the compressors stay as published. Every cast goes
through model/quant.py, the one place that knows the number formats.
"""

from __future__ import annotations

import dataclasses

import torch

from convert.errors import ConvertError
from model import quant
from model.config import ModelConfig

FORMATS = ("keep", "bf16", "int8")


def output_config(cfg: ModelConfig, weights: str) -> ModelConfig:
    """The config describing converted weights: same model, projections stored in the output format."""
    if weights not in FORMATS:
        raise ConvertError(f"--weights {weights!r}: expected one of {FORMATS}")
    if weights == "keep":
        return cfg
    return dataclasses.replace(cfg, dtype=weights, expert_dtype=weights)


def cast_linear(weight: torch.Tensor, scale: torch.Tensor | None, src: str, dst: str
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-store one (local slice of a) linear weight from format `src` to `dst`."""
    if src == dst:
        return weight, scale
    return quant.quantize_weight(quant.dequantize_weight(weight, scale, src), dst)

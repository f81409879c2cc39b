"""Linear layers that keep their weight in its stored format and dequantise it per use.

`Linear.weight` (and `Linear.scale` for fp8 / fp4 / int8) have exactly the checkpoint's shapes and dtypes, so a
state dict in official names loads without conversion and the resident memory is the quantised size. Each call
dequantises the weight into the activation dtype (exact: e4m3 / e2m1 values times a power of two) and runs a
plain matmul (`kernels.linear`; the model points every layer at its `Kernels` table). With `act_quant` (off by default; `ModelConfig.act_quant`) an fp8 / fp4 layer first rounds its input to
FP8 e4m3 per 128 values with power-of-two scales, as the official FP8 / FP4 GEMMs quantise activations, which makes
the numerics those of the official model. A fused-kernel backend's `linear` reads `weight` and `scale` directly.

Column- and row-parallel variants take their slice sizes from a `ParallelContext`: a column-parallel layer holds
out_features / tp rows, a row-parallel one in_features / tp columns and sums its partial outputs over the tp group.

Projections that read the same input (attention's wq_a and wkv, a compressor's wkv and wgate, an expert's w1 and
w3) can keep their weights as row blocks of one tensor (`share_rows`, `JointRows`): each layer keeps its own
checkpoint name and shape, and one matmul launch serves all of them (at decode a launch costs about as much as a
small projection's bytes).
"""

from __future__ import annotations

import torch
from torch import nn

from model import quant
from model.kernels import REFERENCE, Kernels
from model.parallel import ParallelContext

__all__ = ["Linear", "ColumnParallelLinear", "RowParallelLinear", "can_share_rows", "share_rows", "JointRows"]


class Linear(nn.Module):
    """y = x W^T with W [out, in] stored as `fmt` (see `quant.FORMATS`); no bias (V4 has none)."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16"):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.act_quant = False
        self.kernels: Kernels = REFERENCE      # `Transformer` points it at the model's table
        (w_shape, w_dtype), scale = quant.weight_layout(out_features, in_features, fmt)
        self.weight = nn.Parameter(torch.empty(w_shape, dtype=w_dtype), requires_grad=False)
        if scale is None:
            self.register_parameter("scale", None)
        else:
            self.scale = nn.Parameter(torch.empty(scale[0], dtype=scale[1]), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight in `dtype`."""
        return quant.dequantize_weight(self.weight, self.scale, self.fmt, dtype)

    @torch.no_grad()
    def set_from_float(self, weight: torch.Tensor) -> None:
        """Quantise a float [out, in] weight into this layer's format (tests, synthetic models)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        q, s = quant.quantize_weight(weight.to(self.weight.device), self.fmt)
        self.weight.copy_(q)
        if s is not None:
            self.scale.copy_(s)

    def round_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as this layer's GEMM sees it: rounded to FP8 per 128 with `act_quant` on an fp8 / fp4 layer."""
        if self.act_quant and self.fmt in ("fp8", "fp4"):
            return quant.fp8_round_trip(x, quant.FP8_BLOCK)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(self.round_input(x), self.weight, self.scale, self.fmt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class ColumnParallelLinear(Linear):
    """Output features split over tensor-parallel ranks; each rank returns its slice (no communication)."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16",
                 parallel: ParallelContext | None = None):
        self.parallel = parallel or ParallelContext()
        super().__init__(in_features, self.parallel.split(out_features, "output features"), fmt)


class RowParallelLinear(Linear):
    """Input features split over tensor-parallel ranks; partial outputs summed (float32) over the tp group."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16",
                 parallel: ParallelContext | None = None):
        self.parallel = parallel or ParallelContext()
        super().__init__(self.parallel.split(in_features, "input features"), out_features, fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.parallel.tp_size == 1:
            return y
        return self.parallel.all_reduce_tp(y.float()).to(x.dtype)


def can_share_rows(linears: list[Linear]) -> bool:
    """Whether one call can serve these layers: the same input size and format, and for FP8, whose scales cover
    128 x 128 blocks, row counts that keep every scale block inside one layer."""
    first = linears[0]
    same = all(lin.in_features == first.in_features and lin.fmt == first.fmt for lin in linears)
    return same and (first.fmt != "fp8" or all(lin.out_features % quant.FP8_BLOCK == 0 for lin in linears))


def share_rows(parts: list[list[torch.Tensor]], copy: bool = True) -> torch.Tensor:
    """One tensor [n, sum of the parts' rows, ...] whose block [i, offset_j : offset_j + rows_j] holds parts[j][i]
    (n tensors per part, each [rows_j, ...], one dtype and trailing shape), and each part re-pointed at its block
    (`.data`), so that it keeps its name, shape and values while one call reads them all. `copy=False`: the values
    are not kept (freshly built modules, still uninitialised)."""
    first = parts[0][0]
    rows = [part[0].shape[0] for part in parts]
    joint = torch.empty((len(parts[0]), sum(rows), *first.shape[1:]), dtype=first.dtype, device=first.device)
    at = 0
    for part, n in zip(parts, rows):
        for i, t in enumerate(part):
            if copy:
                joint[i, at:at + n].copy_(t.data)
            t.data = joint[i, at:at + n]
        at += n
    return joint


class JointRows(nn.Module):
    """A module whose same-input `Linear` children (`joint_names`) share one weight (and scale) tensor, multiplied
    by one call (`joint`). Kept joint through `.to()` / `.cuda()`, which replace every parameter's tensor. Layers
    that cannot share (`can_share_rows`), or whose module sets `rows_shared` False (their storage is someone
    else's), run one call each. The joint call rounds its input as the first layer does (`act_quant` is set for
    the whole model at once)."""

    joint_names: tuple[str, ...] = ()
    rows_shared = True

    def join_rows(self, copy: bool = True) -> None:
        """Re-point the `joint_names` layers at one weight (and scale) tensor where they can share it (`copy=False`:
        freshly built, values not kept); subclasses call it at the end of __init__."""
        self._joint = None
        if not self.rows_shared:
            return
        linears = [getattr(self, name) for name in self.joint_names]
        if can_share_rows(linears):
            first = linears[0]
            scales = None if first.scale is None else share_rows([[lin.scale] for lin in linears], copy)[0]
            self._joint = (share_rows([[lin.weight] for lin in linears], copy)[0], scales)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.join_rows()
        return out

    def joint(self, x: torch.Tensor, f32: bool = False) -> list[torch.Tensor]:
        """Each joint layer applied to x: `kernels.linear` (x's dtype), or with `f32` `kernels.f32_linear` (float32
        output; bf16 / float32 weights only), in `joint_names` order."""
        linears = [getattr(self, name) for name in self.joint_names]
        if self._joint is None:
            return [lin.kernels.f32_linear(x, lin.weight) if f32 else lin(x) for lin in linears]
        first = linears[0]
        weight, scale = self._joint
        y = first.kernels.f32_linear(x, weight) if f32 else first.kernels.linear(first.round_input(x), weight, scale,
                                                                                  first.fmt)
        return list(y.split([lin.out_features for lin in linears], dim=-1))

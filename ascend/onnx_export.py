"""Export V4 attention, stage by stage and as a whole layer, as static-shape ONNX graphs.

Graph compilers for Ascend (ATC / GE) and onnxruntime both consume the output. Everything is standard
ONNX (opset 20) except the fused stages, which appear as single nodes of the custom domain
`ascend.deploy` (version 1) so a compiler can map them to one fused kernel
(`npu_sparse_flash_attention`, `npu_lightning_indexer`):

| node                          | inputs                                        | attribute   | output                 |
|-------------------------------|-----------------------------------------------|-------------|------------------------|
| `ascend.deploy::SparseAttention` | q [B,S,H,D], kv [B,T,D], indices [B,S,K] int32, sink [H] f32 | scale: float | [B,S,H,D] |
| `ascend.deploy::IndexerTopK`  | q [B,S,Hi,Di], k [B,T,Di], weights [B,S,Hi], n_visible [B,S] int64 | topk: int | int32 [B,S,topk], -1 padded |

Each such node is also a model-local ONNX *function* whose body is the reference computation in
standard operators (`model.kernels`), so onnxruntime or any runtime that does not know the domain
inlines it and runs the graph unchanged. Semantics are the `model.kernels` docstrings; see
docs/attention.md for the stage graph. Exports use the TorchScript exporter (`dynamo=False`): the
dynamo exporter needs onnxscript, which this toolkit does not depend on.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ascend.errors import AscendDeployError
from model.kernels import REFERENCE, Kernels

DOMAIN = "ascend.deploy"
DOMAIN_VERSION = 1
OPSET = 20


class ExportError(AscendDeployError):
    """An export request that cannot be met (bad option combination, unreadable config)."""


# ------------------------------------------------------------------------------------ fused stages as functions
class SparseAttention(nn.Module):
    """`kernels.sparse_attn` as a module, so the exporter emits it as one function node."""

    attributes = ("scale",)

    def forward(self, q, kv, indices, sink, scale):
        return REFERENCE.sparse_attn(q, kv, indices, sink, scale)


class IndexerTopK(nn.Module):
    """`kernels.indexer_topk` as a module (one function node); tensor parallelism is not exported."""

    attributes = ("topk",)

    def forward(self, q, k, weights, n_visible, topk, group=None):
        if group is not None:
            raise ExportError("indexer_topk: tensor-parallel groups cannot be exported; export a single rank")
        return REFERENCE.indexer_topk(q, k, weights, n_visible, topk)


FUSED = (SparseAttention, IndexerTopK)


class ExportKernels(nn.Module):
    """Owns one module per fused stage (they must be submodules of the exported module to become functions)
    and the `Kernels` table that routes the model's calls through them."""

    def __init__(self):
        super().__init__()
        self.sparse_attn = SparseAttention()
        self.indexer_topk = IndexerTopK()

    def table(self) -> Kernels:
        return dataclasses.replace(REFERENCE, sparse_attn=self.sparse_attn, indexer_topk=self.indexer_topk)


def _retag(model, attributes: dict[str, dict[str, Any]]):
    """Move the exporter's function domain (this module's name) to `ascend.deploy` and attach the attributes
    (e.g. SparseAttention.scale) that the function body holds as constants, so a compiler can read them."""
    import onnx
    from onnx import helper

    source = __name__
    for f in model.functions:
        if f.domain == source:
            f.domain = DOMAIN
            f.attribute.extend(sorted(attributes.get(f.name, {})))
    for node in model.graph.node:
        if node.domain == source:
            node.domain = DOMAIN
            for name, value in sorted(attributes.get(node.op_type, {}).items()):
                node.attribute.append(helper.make_attribute(name, value))
    for op in model.opset_import:
        if op.domain == source:
            op.domain, op.version = DOMAIN, DOMAIN_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def export_graph(module: nn.Module, args: Sequence[torch.Tensor], path: Path, input_names: Sequence[str],
                 output_names: Sequence[str], attributes: dict[str, dict[str, Any]] | None = None):
    """Trace `module(*args)` to `path` with static shapes; fused submodules become `ascend.deploy` nodes.

    Returns the checked `onnx.ModelProto`.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about its own deprecation and tracing
        torch.onnx.export(module, tuple(args), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(input_names), output_names=list(output_names),
                          export_modules_as_functions=set(FUSED), do_constant_folding=True)
    model = _retag(onnx.load(str(path)), attributes or {})
    onnx.save(model, str(path))
    return model


# ------------------------------------------------------------------------------------ synthetic layers
def use_kernels(module: nn.Module, kernels: Kernels) -> nn.Module:
    """Point every submodule that calls kernels (attention, compressor, indexer, norms) at `kernels`."""
    for m in module.modules():
        if isinstance(getattr(m, "kernels", None), Kernels):
            m.kernels = kernels
    return module


@torch.no_grad()
def synthetic_attention(config, layer_id: int, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """`model.attention.Attention` of `layer_id` with random weights of realistic scale (1/sqrt(fan-in)), for
    exports and benchmarks without a checkpoint. Linear weights are stored in `config.dtype`."""
    from model.attention import Attention
    from model.linear import Linear

    gen = torch.Generator().manual_seed(seed)
    attn = Attention(config, layer_id)
    for m in attn.modules():
        if isinstance(m, Linear):
            m.set_from_float(torch.randn(m.out_features, m.in_features, generator=gen) * m.in_features ** -0.5)
    for name, p in attn.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(("attn_sink", "ape")):
            p.copy_(torch.randn(p.shape, generator=gen))
    return attn.to(device).eval()

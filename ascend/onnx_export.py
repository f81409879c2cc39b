"""Export V4 attention, stage by stage and as a whole layer, as static-shape ONNX graphs.

Graph compilers for Ascend (ATC / GE) and onnxruntime both consume the output. Everything is standard
ONNX (opset 20) except the fused stages, which appear as single nodes of the custom domain
`ascend.deploy` (version 1) so a compiler can map them to one fused kernel
(`npu_sparse_flash_attention`, `npu_lightning_indexer`):

| node                          | inputs                                        | attribute   | output                 |
|-------------------------------|-----------------------------------------------|-------------|------------------------|
| `ascend.deploy::SparseAttention` | q [B,S,H,D], kv [B,T,D], indices [B,S,K] int32, sink [H] f32 | scale: float | [B,S,H,D] |
| `ascend.deploy::IndexerTopK`  | q [B,S,Hi,Di], k [B,T,Di], weights [B,S,Hi], n_visible [B,S] int64 | topk: int | int32 [B,S,topk], -1 padded |
| `ascend.deploy::Fp8RoundTrip` | x [..., n] | block: int | x quantised to e4m3 per block (power-of-two scale) and back |
| `ascend.deploy::Fp4RoundTrip` | x [..., n] | block: int | x quantised to e2m1 per block (power-of-two scale) and back |

Each such node is also a model-local ONNX *function* whose body is the reference computation in
standard operators (`model.kernels`), so onnxruntime or any runtime that does not know the domain
inlines it and runs the graph unchanged. Semantics are the `model.kernels` docstrings; see
docs/attention.md for the stage graph. Exports use the TorchScript exporter (`dynamo=False`): the
dynamo exporter needs onnxscript, which this toolkit does not depend on.

SparseAttention and IndexerTopK are emitted by `torch.autograd.Function.symbolic` with exactly the inputs of the
table, and their bodies are exported on their own with those names (the exporter's function extraction passes
whatever tensors the traced body reads, in trace order, with weights such as the sink folded inside). The round
trips, one tensor in and out, are extracted functions.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import torch
from torch import nn

from ascend.errors import AscendDeployError
from model.kernels import REFERENCE, Kernels, use_kernels
from model import quant
from model.quant import FP4_BLOCK, KV_FP8_BLOCK

DOMAIN = "ascend.deploy"
DOMAIN_VERSION = 1
OPSET = 20


class ExportError(AscendDeployError):
    """An export request that cannot be met (bad option combination, unreadable config)."""


# ------------------------------------------------------------------------------------ fused stages as functions
class SparseAttention(torch.autograd.Function):
    """`kernels.sparse_attn`; exported as one `ascend.deploy::SparseAttention` node (q, kv, indices, sink; scale)."""

    inputs = ("q", "kv", "indices", "sink")

    @staticmethod
    def forward(ctx, q, kv, indices, sink, scale):
        return REFERENCE.sparse_attn(q, kv, indices, sink, scale)

    @staticmethod
    def symbolic(g, q, kv, indices, sink, scale):
        out = g.op(f"{DOMAIN}::SparseAttention", q, kv, indices, sink, scale_f=scale)
        out.setType(q.type())
        return out


class IndexerTopK(torch.autograd.Function):
    """`kernels.indexer_topk` (single rank); one `ascend.deploy::IndexerTopK` node (q, k, weights, n_visible; topk)."""

    inputs = ("q", "k", "weights", "n_visible")

    @staticmethod
    def forward(ctx, q, k, weights, n_visible, topk):
        return REFERENCE.indexer_topk(q, k, weights, n_visible, topk)

    @staticmethod
    def symbolic(g, q, k, weights, n_visible, topk):
        out = g.op(f"{DOMAIN}::IndexerTopK", q, k, weights, n_visible, topk_i=topk)
        out.setType(q.type().with_dtype(torch.int32).with_sizes(q.type().sizes()[:2] + [topk]))
        return out


class _Body(nn.Module):
    """A fused operator's reference computation with its attributes bound, exported alone as the function body."""

    def __init__(self, op: type[torch.autograd.Function], attributes: dict[str, Any]):
        super().__init__()
        self.op, self.attributes = op, attributes

    def forward(self, *tensors):
        return self.op.forward(None, *tensors, *self.attributes.values())


def function_body(op: type[torch.autograd.Function], specs: Sequence[tuple], attributes: dict[str, Any]):
    """The model-local `ascend.deploy` function of `op`: its reference traced alone at the call's shapes and dtypes
    (`specs`), inputs named as the table documents; the attributes are declared, their values are constants of
    the body (as in the call that was traced)."""
    import onnx
    from onnx import helper

    examples = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in specs)   # index inputs 0: always valid
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Body(op, attributes), examples, buffer, dynamo=False, opset_version=OPSET,
                          input_names=list(op.inputs), output_names=["out"], do_constant_folding=True)
    body = onnx.load_from_string(buffer.getvalue()).graph
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in body.initializer]
    return helper.make_function(DOMAIN, op.__name__, [i.name for i in body.input], ["out"],
                                constants + list(body.node), [helper.make_opsetid("", OPSET)],
                                attributes=sorted(attributes))


class Fp8RoundTrip(nn.Module):
    """`model.quant.fp8_round_trip` as one node (a graph compiler may map it to a quantise/dequantise pair)."""

    def forward(self, x, block=KV_FP8_BLOCK):
        return quant.fp8_round_trip_float(x, block)


class Fp4RoundTrip(nn.Module):
    """`model.quant.fp4_round_trip` as one node."""

    def forward(self, x, block=FP4_BLOCK):
        return quant.fp4_round_trip_float(x, block)


EXTRACTED = (Fp8RoundTrip, Fp4RoundTrip)       # modules the exporter turns into functions itself
MAX_QUANT_CALLS = 4     # per format and graph; each call needs its own module (the exporter's function
                        # extraction fails on a module called twice in one trace)


class ExportKernels(nn.Module):
    """The `Kernels` table that routes the model's fused calls to exportable forms, one per traced graph
    (`StageGraph`): the round trips through one module per call (submodules of the exported module, so the
    exporter extracts them as functions), the two fused operators through their symbolic Functions, recording
    each call's shapes for its function body (`calls`)."""

    def __init__(self):
        super().__init__()
        self.fp8 = nn.ModuleList(Fp8RoundTrip() for _ in range(MAX_QUANT_CALLS))
        self.fp4 = nn.ModuleList(Fp4RoundTrip() for _ in range(MAX_QUANT_CALLS))
        self.blocks: dict[str, set[int]] = {"fp8": set(), "fp4": set()}
        self.used = {"fp8": 0, "fp4": 0}
        self.calls: dict[type, tuple[list, dict]] = {}

    def table(self) -> Kernels:
        return dataclasses.replace(REFERENCE, sparse_attn=self._sparse_attn, indexer_topk=self._indexer_topk,
                                   fp8_round_trip=functools.partial(self._round_trip, "fp8"),
                                   fp4_round_trip=functools.partial(self._round_trip, "fp4"))

    def _fused(self, op: type[torch.autograd.Function], tensors: tuple, attributes: dict[str, Any]):
        if op in self.calls:
            raise ExportError(f"{op.__name__} called twice in one graph (its function body has one call's shapes)")
        self.calls[op] = ([(tuple(t.shape), t.dtype) for t in tensors], attributes)
        return op.apply(*tensors, *attributes.values())

    def _sparse_attn(self, q, kv, indices, sink, scale):
        return self._fused(SparseAttention, (q, kv, indices, sink), {"scale": float(scale)})

    def _indexer_topk(self, q, k, weights, n_visible, topk, group=None):
        if group is not None:
            raise ExportError("indexer_topk: tensor-parallel groups cannot be exported; export a single rank")
        return self._fused(IndexerTopK, (q, k, weights, n_visible), {"topk": int(topk)})

    def _round_trip(self, fmt: str, x: torch.Tensor, block: int) -> torch.Tensor:
        """The model's FP8 / FP4 simulation as the next unused module of that format (one per call site)."""
        if self.used[fmt] == MAX_QUANT_CALLS:
            raise ExportError(f"more than {MAX_QUANT_CALLS} {fmt} simulations in one graph")
        module = getattr(self, fmt)[self.used[fmt]]
        self.used[fmt] += 1
        self.blocks[fmt].add(block)
        return module(x, block)


def _retag(model, attributes: dict[str, dict[str, Any]]):
    """Move the exporter's extracted functions (the round trips, in the domain named after this module) to
    `ascend.deploy` and attach the attributes (e.g. Fp8RoundTrip.block) that their bodies hold as constants, so a
    compiler can read them."""
    import onnx
    from onnx import helper

    source = __name__
    if any(op.domain == DOMAIN for op in model.opset_import):     # the symbolic nodes already imported it
        kept = [op for op in model.opset_import if op.domain != source]
        del model.opset_import[:]
        model.opset_import.extend(kept)
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
    """Trace `module(*args)` to `path` with static shapes; fused calls become `ascend.deploy` nodes, each with its
    function body (a `StageGraph`'s `fused.calls`).

    Returns the checked `onnx.ModelProto`.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about its own deprecation and tracing
        torch.onnx.export(module, tuple(args), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(input_names), output_names=list(output_names),
                          export_modules_as_functions=set(EXTRACTED),
                          do_constant_folding=True)
    model = onnx.load(str(path))
    calls = module.fused.calls if isinstance(getattr(module, "fused", None), ExportKernels) else {}
    model.functions.extend(function_body(op, specs, attrs) for op, (specs, attrs) in calls.items())
    model = _retag(model, attributes or {})
    onnx.save(model, str(path))
    return model


# ------------------------------------------------------------------------------------ synthetic layers
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


# ------------------------------------------------------------------------------------ stages
LAYER_TYPES = {"window": 0, "csa": 4, "hca": 128}
STAGES = ("prolog", "compress", "select", "attend", "epilog", "layer")


@dataclass(frozen=True)
class ExportSpec:
    """What to export: one layer type, one phase, static sizes. `seq` is 1 for decode; `context` is the cache
    capacity (tokens per sequence) the graphs are built for. Activations are float32 (a graph compiler lowers
    precision itself, e.g. ATC --precision_mode); weights are BF16 values."""

    layer_type: str
    phase: str
    batch: int = 1
    seq: int = 1
    context: int = 4096

    def __post_init__(self):
        if self.layer_type not in LAYER_TYPES:
            raise ExportError(f"--layer-type {self.layer_type!r}: expected one of {', '.join(LAYER_TYPES)}")
        if self.phase not in ("prefill", "decode"):
            raise ExportError(f"--phase {self.phase!r}: expected prefill or decode")
        if self.phase == "decode" and self.seq != 1:
            raise ExportError(f"--seq {self.seq}: a decode step has exactly 1 token per sequence")
        if min(self.batch, self.seq, self.context) < 1 or self.seq > self.context:
            raise ExportError(f"--batch/--seq/--context {self.batch}/{self.seq}/{self.context}: expected positive "
                              f"sizes with seq <= context")


def layer_id_for(config, layer_type: str) -> int:
    """The first layer of that type (window-only falls back to the MTP layer, which V4-Pro's main layers lack)."""
    ratio = LAYER_TYPES[layer_type]
    for i in range(config.n_layers + config.n_mtp_layers):
        if config.compress_ratio(i) == ratio:
            return i
    raise ExportError(f"model config has no {layer_type} layer (compress_ratios {list(config.compress_ratios)})")


def cache_names(ratio: int) -> list[str]:
    """Graph names of a layer cache's tensors, in `cache_tensors` order."""
    names = ["kv"]
    if ratio:
        names += ["compressor_kv", "compressor_score"]
    if ratio == 4:
        names += ["index_kv", "index_compressor_kv", "index_compressor_score"]
    return names


def cache_tensors(cache) -> list[torch.Tensor]:
    out = [cache.kv]
    if cache.compressor is not None:
        out += [cache.compressor.kv, cache.compressor.score]
    if cache.index_kv is not None:
        out += [cache.index_kv, cache.index_compressor.kv, cache.index_compressor.score]
    return out


def cache_from(template, tensors: Sequence[torch.Tensor]):
    """A LayerCache like `template` holding copies of `tensors`: graphs take the cache as inputs and return the
    updated cache as outputs (ONNX graphs are functional; the model updates its cache in place)."""
    from model.cache import CompressorState

    cache = copy.copy(template)
    it = iter(t.clone() for t in tensors)
    cache.kv = next(it)
    if template.compressor is not None:
        cache.compressor = CompressorState(next(it), next(it))
    if template.index_kv is not None:
        cache.index_kv = next(it)
        cache.index_compressor = CompressorState(next(it), next(it))
    return cache


class StageGraph(nn.Module):
    """One stage (or the whole layer) of `attn` as a function of tensors only, ready for tracing."""

    def __init__(self, attn: nn.Module, stage: str, template):
        super().__init__()
        # `attn` is deliberately not a registered submodule: the exporter hooks every submodule to extract
        # functions and fails on modules called twice in one trace (the layer's Rotary); its weights are traced
        # as constants and become initializers all the same.
        object.__setattr__(self, "attn", attn)
        self.stage, self.template = stage, template
        self.fused = ExportKernels()
        use_kernels(attn, self.fused.table())

    def forward(self, *args):
        a = self.attn
        if self.stage == "prolog":
            return a.prolog(*args)
        if self.stage == "compress":
            x, start, n_valid, *tensors = args
            cache = cache_from(self.template, tensors)
            a.compress(x, start, n_valid, cache)
            return tuple(cache_tensors(cache))
        if self.stage == "select":
            if a.indexer is None:       # HCA: every visible entry, a function of positions only
                (positions,) = args
                return a.select(None, None, positions, None, None, self.template)
            x, qr, positions, cos, sin, index_kv = args
            cache = copy.copy(self.template)
            cache.index_kv = index_kv
            return a.select(x, qr, positions, cos, sin, cache)
        if self.stage == "attend":
            q, kv, positions, start, n_valid, *rest = args
            entry_rows = rest.pop(0) if a.ratio else None
            cache = copy.copy(self.template)
            cache.kv = rest[0].clone()
            return a.attend(q, kv, positions, start, n_valid, entry_rows, cache), cache.kv
        if self.stage == "epilog":
            return a.epilog(*args)
        x, start, n_valid, *tensors = args
        cache = cache_from(self.template, tensors)
        return (a(x, start, cache, n_valid), *cache_tensors(cache))


def stage_io(attn, spec: ExportSpec, x, start, n_valid, cache) -> dict[str, tuple[list, list, list[str]]]:
    """Per stage: (input names, example inputs, output names), the examples computed by running the stages
    eagerly on a copy of `cache` so every graph sees realistic values."""
    ratio = attn.ratio
    names = cache_names(ratio)
    tensors = cache_tensors(cache)
    work = cache_from(cache, tensors)
    positions = start[:, None] + torch.arange(spec.seq)
    q, qr, kv, cos, sin = attn.prolog(x, positions)
    io = {"prolog": (["x", "positions"], [x, positions], ["q", "qr", "kv_new", "cos", "sin"])}
    if ratio:
        io["compress"] = (["x", "start", "n_valid", *names], [x, start, n_valid, *tensors],
                          [f"{n}_out" for n in names])
        attn.compress(x, start, n_valid, work)
        if attn.indexer is not None:
            io["select"] = (["x", "qr", "positions", "cos", "sin", "index_kv"],
                            [x, qr, positions, cos, sin, work.index_kv], ["entry_rows"])
        else:
            io["select"] = (["positions"], [positions], ["entry_rows"])
    entry_rows = attn.select(x, qr, positions, cos, sin, work)
    rows = [entry_rows] if ratio else []
    io["attend"] = (["q", "kv_new", "positions", "start", "n_valid", *(["entry_rows"] if ratio else []), "kv"],
                    [q, kv, positions, start, n_valid, *rows, work.kv], ["o", "kv_out"])
    o = attn.attend(q, kv, positions, start, n_valid, entry_rows, cache_from(work, cache_tensors(work)))
    io["epilog"] = (["o", "cos", "sin"], [o, cos, sin], ["y"])
    io["layer"] = (["x", "start", "n_valid", *names], [x, start, n_valid, *tensors],
                   ["y", *[f"{n}_out" for n in names]])
    return io


def example_inputs(config, layer_id: int, spec: ExportSpec, seed: int = 0):
    """(x, start, n_valid, cache) for a graph of `spec`: random activations and cache contents, the chunk placed
    at the end of the context (decode: the last position) so every cache row is in use."""
    from model.cache import LayerCache

    gen = torch.Generator().manual_seed(seed)
    cache = LayerCache(config, layer_id, spec.batch, spec.context, torch.float32)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen))
    if cache.index_kv is not None:
        cache.index_kv.copy_(torch.randn(cache.index_kv.shape, generator=gen))
    for state in (cache.compressor, cache.index_compressor):
        if state is not None:   # a half-filled block: the first slots hold tokens, the rest are empty (-inf)
            state.kv.copy_(torch.randn(state.kv.shape, generator=gen))
            state.score.copy_(torch.randn(state.score.shape, generator=gen))
            state.score[:, state.score.size(1) // 2:] = float("-inf")
    x = torch.randn(spec.batch, spec.seq, config.dim, generator=gen)
    first = spec.context - spec.seq     # prefill of the whole context starts at 0 with empty state
    if first == 0:
        cache.reset()
    start = torch.full((spec.batch,), first, dtype=torch.int64)
    n_valid = torch.full((spec.batch,), spec.seq, dtype=torch.int64)
    return x, start, n_valid, cache


def export_attention(config, spec: ExportSpec, out_dir: Path, stages: Sequence[str] = STAGES, attn=None,
                     inputs=None, progress=None) -> dict:
    """Write `<stage>.onnx` for each stage of one attention layer (and `layer.onnx`), plus `manifest.json`.

    attn / inputs: the layer and (x, start, n_valid, cache) to trace with (default: synthetic weights and
    `example_inputs`). Returns the manifest: per file its inputs (name, shape, dtype), its output names and the
    custom-domain operators it contains.
    """
    layer_id = layer_id_for(config, spec.layer_type)
    if attn is None:
        attn = synthetic_attention(config, layer_id)
    x, start, n_valid, cache = inputs if inputs is not None else example_inputs(config, layer_id, spec)
    attributes = {"Fp8RoundTrip": {"block": KV_FP8_BLOCK}, "Fp4RoundTrip": {"block": FP4_BLOCK}}   # extracted ones
    manifest = {"layer_type": spec.layer_type, "layer_id": layer_id, "phase": spec.phase, "batch": spec.batch,
                "seq": spec.seq, "context": spec.context, "quant_sim": bool(config.quant_sim),
                "opset": OPSET, "custom_domain": {"name": DOMAIN, "version": DOMAIN_VERSION}, "graphs": {}}
    with torch.no_grad():
        stage_args = stage_io(attn, spec, x, start, n_valid, cache)
        for stage in stages:
            if stage not in stage_args:         # window-only layers have no compress / select
                continue
            in_names, args, out_names = stage_args[stage]
            path = out_dir / f"{stage}.onnx"
            graph = StageGraph(attn, stage, cache)
            model = export_graph(graph, args, path, in_names, out_names, attributes)
            if graph.fused.blocks["fp8"] - {KV_FP8_BLOCK} or graph.fused.blocks["fp4"] - {FP4_BLOCK}:
                raise RuntimeError(f"quantisation blocks {graph.fused.blocks} differ from the attributes written")
            manifest["graphs"][stage] = {
                "file": path.name,
                "inputs": [_describe(n, t) for n, t in zip(in_names, args)],
                "outputs": [o.name for o in model.graph.output],
                "custom_ops": sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == DOMAIN})}
            if progress is not None:
                progress(stage)
    use_kernels(attn, REFERENCE)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _describe(name: str, t: torch.Tensor) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


# ------------------------------------------------------------------------------------ command line
def export_config(preset: str | None, config_dir: Path | None, quant_sim: bool = True):
    """The model config to export: BF16 weights (FP8 weight dequantisation is not exportable), with or without
    the FP8/FP4 round-trip simulations of activations (see docs/attention.md)."""
    from model.config import ModelConfig

    if (preset is None) == (config_dir is None):
        raise ExportError("export-onnx: give exactly one of --preset or --config")
    overrides = dict(dtype="bf16", quant_sim=quant_sim)
    if preset is not None:
        return ModelConfig.preset(preset, **overrides)
    return ModelConfig.from_hf(config_dir, **overrides)


@click.command("export-onnx")
@click.option("--preset", type=click.Choice(["tiny", "flash", "pro"]), default=None, help="Published model shape.")
@click.option("--config", "config_dir", type=click.Path(exists=True, path_type=Path), default=None,
              help="Checkpoint directory (or config.json) to read the shape from.")
@click.option("--layer-type", type=click.Choice(list(LAYER_TYPES)), required=True,
              help="window (ratio 0), csa (ratio 4, indexer) or hca (ratio 128).")
@click.option("--phase", type=click.Choice(["prefill", "decode"]), required=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences per call.")
@click.option("--seq", type=int, default=None, help="Tokens per sequence per call (decode: 1; prefill: context).")
@click.option("--context", type=int, default=None, help="Cache capacity in tokens [min(4096, max_seq_len)].")
@click.option("--stages", default=",".join(STAGES), show_default=True, help="Comma-separated stages to write.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A new or empty directory for the graphs and manifest.json.")
@click.option("--quant-sim/--no-quant-sim", default=True, show_default=True,
              help="Keep the FP8 KV / FP4 indexer round trips (as ascend.deploy::Fp8RoundTrip / Fp4RoundTrip).")
@click.option("--dry-run", is_flag=True, help="Print what would be written, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_onnx_command(preset, config_dir, layer_type, phase, batch, seq, context, stages, out_dir, quant_sim,
                        dry_run, as_json):
    """Export one attention layer's stages and the whole layer as static-shape ONNX graphs."""
    from tqdm import tqdm

    config = export_config(preset, config_dir, quant_sim)
    context = min(4096, config.max_seq_len) if context is None else context
    seq = (1 if phase == "decode" else context) if seq is None else seq
    spec = ExportSpec(layer_type, phase, batch, seq, context)
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(STAGES)):
        raise ExportError(f"--stages: unknown {unknown}, expected some of {', '.join(STAGES)}")
    if not chosen:
        raise ExportError(f"--stages {stages!r}: no stage named, expected some of {', '.join(STAGES)}")
    chosen = [s for s in chosen if LAYER_TYPES[layer_type] or s not in ("compress", "select")]
    if not chosen:
        raise ExportError(f"--stages {stages!r}: a window layer has no compress or select stage")
    if out_dir.is_dir() and (held := sorted(p.name for p in out_dir.iterdir())):
        # an earlier export's graphs left beside this one's would read as part of it
        raise ExportError(f"--out {out_dir}: not empty (holds {held[0]}); export into a new or empty directory")
    if dry_run:
        plan = {"spec": {**dataclasses.asdict(spec)}, "layer_id": layer_id_for(config, layer_type),
                "files": [str(out_dir / f"{s}.onnx") for s in chosen] + [str(out_dir / "manifest.json")]}
        click.echo(json.dumps(plan, indent=1) if as_json else "\n".join(["would write:", *plan["files"]]))
        return
    with tqdm(total=len(chosen), desc="export", unit="graph", disable=as_json) as bar:
        manifest = export_attention(config, spec, out_dir, chosen, progress=lambda _: bar.update())
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
        return
    for stage, g in manifest["graphs"].items():
        size = (out_dir / g["file"]).stat().st_size / 2 ** 20
        ops = ", ".join(g["custom_ops"]) or "standard ops only"
        click.echo(f"{stage:9s} {out_dir / g['file']}  {size:8.1f} MiB  {ops}")

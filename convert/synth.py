"""`ascend synth`: a synthetic checkpoint in the exact published layout, written as a stream.

Same tensor names, dtypes, shapes, scale shapes, shard files and index as a real DeepSeek-V4
checkpoint (official or HF-style names), with small random values quantised through model/quant.py,
so every tool can be exercised without the real weights. Values are a pure function of (seed, tensor
name), so a seed always gives the same bytes. Tensors are generated and written one at a time (big
ones in row blocks), so a Flash-width checkpoint needs memory for one tensor, not the model.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import click
import torch
from tqdm import tqdm

from ascend.cli import json_option
from convert.errors import ConvertError
from convert.layout import TensorSpec, expected_groups
from convert.names import to_hf
from convert.reader import INDEX
from convert.writer import SafetensorsWriter, write_json_atomic
from model import quant
from model.config import ModelConfig

ROWS_PER_CHUNK = 8192


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))


def _values(spec: TensorSpec, cfg: ModelConfig, g: torch.Generator, rows: tuple[int, int]) -> torch.Tensor:
    """Float values (or int64 expert ids) for rows [a, b) of a non-quantised tensor."""
    a, b = rows
    shape = (b - a, *spec.shape[1:])
    leaf = spec.name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":  # hash routing: distinct valid expert ids per token
        return torch.rand(b - a, cfg.n_routed_experts, generator=g).argsort(dim=1)[:, : spec.shape[1]]
    x = torch.randn(shape, generator=g)
    if spec.name.endswith("norm.weight"):
        return 1.0 + 0.05 * x                      # RMSNorm gains near 1
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return x * spec.shape[-1] ** -0.5           # mixing logits of order 1
    if leaf.startswith("hc_") and leaf.endswith("_scale"):
        return 0.5 + 0.1 * x
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        return 0.1 * x
    if leaf in ("attn_sink", "ape", "bias"):
        return 0.1 * x
    if spec.name == "embed.weight":
        return x
    return x * spec.shape[-1] ** -0.5               # projections: unit-variance outputs


def _tensors(group: list[TensorSpec], cfg: ModelConfig, seed: int):
    """(spec, row-block iterator) for every tensor of a shard, quantised weights with their scales."""
    by_name = {s.name: s for s in group}
    for spec in group:
        if spec.quant and spec.quant.endswith("_scale"):
            continue
        g = _generator(seed, spec.name)
        if spec.quant:  # a quantised weight: build float values of the logical shape, encode, emit both
            out_f, in_f = spec.shape[0], spec.shape[1] * (2 if spec.quant == "fp4" else 1)
            weight, scale = quant.quantize_weight(torch.randn(out_f, in_f, generator=g) * in_f ** -0.5, spec.quant)
            yield spec, [weight]
            yield by_name[spec.name[: -len(".weight")] + ".scale"], [scale]
            continue
        dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[spec.dtype]
        n = spec.shape[0] if spec.shape else 1
        yield spec, (_values(spec, cfg, g, (a, min(n, a + ROWS_PER_CHUNK))).to(dtype)
                     for a in range(0, n, ROWS_PER_CHUNK))


def write_synthetic(out: str | Path, cfg: ModelConfig, seed: int = 0, hf_names: bool = False,
                    progress: bool = False, dry_run: bool = False) -> dict:
    """Write a synthetic checkpoint for `cfg` into the new or empty directory `out`; returns a summary (`dry_run`:
    the summary of what would be written, nothing written)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out}: output directory is not empty; synth writes into a new or empty directory")
    groups = expected_groups(cfg)
    total = sum(s.nbytes for g in groups for s in g)
    summary = {"out": str(out), "files": len(groups), "tensors": sum(len(g) for g in groups), "bytes": total,
               "names": "hf" if hf_names else "official", "seed": seed}
    if dry_run:
        return summary
    out.mkdir(parents=True, exist_ok=True)
    key = to_hf if hf_names else (lambda n: n)
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="synth", disable=not progress) as bar:
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            writer = SafetensorsWriter(out / fname, [(key(s.name), s.dtype, s.shape) for s in group])
            for spec, chunks in _tensors(group, cfg, seed):
                writer.write_chunks(key(spec.name), chunks)
                weight_map[key(spec.name)] = fname
                bar.update(spec.nbytes)
            writer.finish()
    write_json_atomic(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(out / "config.json", cfg.to_hf_dict())
    from model.tokenizer import write_synthetic_tokenizer
    write_synthetic_tokenizer(out, cfg.vocab_size)
    return summary


@click.command("synth")
@click.option("--preset", type=click.Choice(["tiny", "flash", "pro"]), default="tiny", show_default=True)
@click.option("--layers", type=int, default=None, help="Number of main layers (default: the preset's).")
@click.option("--experts", type=int, default=None, help="Routed experts per layer (default: the preset's).")
@click.option("--hf-names", is_flag=True, help="Use HF-style tensor names (model.layers.N.self_attn...).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="New or empty directory.")
@click.option("--dry-run", is_flag=True,
              help="Print what would be written (flash / pro: the full size), write nothing.")
@json_option
def synth_command(preset, layers, experts, hf_names, seed, out, dry_run, as_json):
    """Write a synthetic checkpoint in the published DeepSeek-V4 layout."""
    overrides = {}
    if layers is not None:
        overrides["n_layers"] = layers
    if experts is not None:
        overrides["n_routed_experts"] = experts
    cfg = ModelConfig.preset(preset, **overrides)
    summary = write_synthetic(out, cfg, seed=seed, hf_names=hf_names, progress=not as_json, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(f"{'would write' if dry_run else 'wrote'} {summary['tensors']} tensors, "
                   f"{summary['bytes'] / 2**30:.2f} GiB in {summary['files']} shards to {out}")

"""`ascend verify`: is a converted output complete, intact, and equal to its source?

Three levels, each stopping at the first problem with a ConvertError that names it:
1. the manifest exists (it is written last, so an interrupted conversion fails here);
2. completeness against the plan: every rank holds exactly the tensors the plan and config call for,
   with the right dtypes and local shapes; every file's size and sha256, every tensor's sha256 match;
3. with `against`: every output tensor equals its source slice (read independently with get_slice)
   after the declared cast (`keep`: the same bytes; `bf16` / `int8`: model/quant.py's dequantisation,
   then the output encoding).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from convert.errors import ConvertError
from convert.layout import expected_tensors
from convert.manifest import MANIFEST, rank_entry, read_manifest
from convert.reader import Checkpoint, read_header, safe_member
from convert.shard import Sharding, scale_split
from convert.writer import TORCH_DTYPES, hash_file
from model import quant
from model.config import ModelConfig


def expected_rank_tensors(cfg_out: ModelConfig, sharding: Sharding, rank: int) -> dict[str, tuple[str, tuple]]:
    """Output name -> (dtype, local shape) that rank `rank` must hold."""
    want = {}
    for spec in expected_tensors(cfg_out).values():
        for piece in sharding.pieces(spec, rank):
            want[piece.name] = (spec.dtype, sharding.local_shape(spec))
    return want


def verify(out: str | Path, against: str | Path | None = None, plan=None, progress: bool = False) -> dict:
    """Check a conversion; returns a summary, raises ConvertError at the first mismatch."""
    out = Path(out)
    m = read_manifest(out)
    origin = out / MANIFEST
    cfg_out = ModelConfig.from_hf(m["config"])
    if plan is None:
        from ascend.planner.plan import Plan
        plan = Plan.load(out / "plan.json")
        if not plan.same_as(m["plan"], str(origin)):
            # the launcher refuses such shards: say so here rather than "ok"
            raise ConvertError(f"{out / 'plan.json'}: differs from the plan the shards were converted with "
                               f"({origin})")
    sharding = Sharding.from_plan(plan, cfg_out, str(out / "plan.json"))
    if sharding.world_size != m["world_size"] or len(m["ranks"]) != m["world_size"]:
        raise ConvertError(f"{origin}: world_size {m['world_size']} with {len(m['ranks'])} ranks recorded; the plan "
                           f"has world size {sharding.world_size}")
    n_files = n_tensors = n_bytes = 0
    total = sum(rec["bytes"] for entry in m["ranks"] for rec in entry["files"].values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="hash", disable=not progress) as bar:
        for rank in range(sharding.world_size):
            n = _check_rank(out, m, cfg_out, sharding, rank, bar)
            n_files, n_tensors, n_bytes = n_files + n[0], n_tensors + n[1], n_bytes + n[2]
    for name, digest in m.get("copied", {}).items():       # tokenizer files (manifests before them have none)
        path = safe_member(out, name, origin, "file")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ConvertError(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    summary = {"ok": True, "out": str(out), "world_size": sharding.world_size, "weights": m["weights"],
               "files": n_files, "tensors": n_tensors, "bytes": n_bytes, "against": None}
    if against is not None:
        compare_with_source(out, m, Checkpoint(against), progress)
        summary["against"] = str(against)
    return summary


def _check_rank(out: Path, m: dict, cfg_out: ModelConfig, sharding: Sharding, rank: int, bar) -> tuple[int, int, int]:
    """Completeness and hashes of one rank; returns (files, tensors, bytes)."""
    origin = out / MANIFEST
    n_files = n_bytes = 0
    entry = rank_entry(m, rank, str(origin))
    want = expected_rank_tensors(cfg_out, sharding, rank)
    have = entry["tensors"]
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise ConvertError(f"{origin}: rank {rank} lacks tensor {name} that the plan puts there")
        if name not in want:
            raise ConvertError(f"{origin}: rank {rank} holds tensor {name} that the plan does not put there")
        if (have[name]["dtype"], tuple(have[name]["shape"])) != want[name]:
            raise ConvertError(f"{origin}: rank {rank} tensor {name} is {have[name]['dtype']} {have[name]['shape']}, "
                               f"expected {want[name][0]} {list(want[name][1])}")
    found = set()
    for rel, rec in entry["files"].items():
        path = safe_member(out, rel, origin)
        file_sha, tensor_sha = hash_file(path)
        if file_sha != rec["sha256"] or path.stat().st_size != rec["bytes"]:
            raise ConvertError(f"{path}: sha256/size differ from the manifest (file changed or corrupt)")
        header, _ = read_header(path)
        for name, e in header.items():
            t = have.get(name)
            if t is None or t["file"] != rel or t["sha256"] != tensor_sha[name] or \
                    (e["dtype"], e["shape"]) != (t["dtype"], t["shape"]):
                raise ConvertError(f"{path}: tensor {name} does not match its manifest entry")
        found |= header.keys()
        n_files += 1
        n_bytes += rec["bytes"]
        bar.update(rec["bytes"])
    lost = sorted(set(have) - found)
    if lost:
        raise ConvertError(f"{origin}: rank {rank} tensor {lost[0]} is in none of the rank's files "
                           f"({len(lost)} tensors without a file)")
    return n_files, len(have), n_bytes


def compare_with_source(out: Path, m: dict, src: Checkpoint, progress: bool = False) -> None:
    """Every output tensor == its source slice after the declared cast (bitwise)."""
    if src.config != ModelConfig.from_hf(m["source_config"]):
        raise ConvertError(f"{src.root / 'config.json'}: describes another model than the source {out} was "
                           f"converted from (manifest source_config)")
    src_table = src.validate()
    out_table = expected_tensors(ModelConfig.from_hf(m["config"]))
    files = [(entry, rel) for entry in m["ranks"] for rel in entry["files"]]
    with tqdm(files, desc="compare", unit="file", disable=not progress) as bar:
        for entry, rel in bar:
            with safe_open(str(out / rel), framework="pt", device="cpu") as f:
                for name in f.keys():
                    rec = entry["tensors"][name]
                    got = f.get_tensor(name)
                    want = _reference(src, src_table, out_table, rec, name)
                    if got.dtype != want.dtype or got.shape != want.shape or \
                            not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
                        raise ConvertError(f"{out / rel}: tensor {name} differs from source {rec['source']} "
                                           f"slice {rec['split']} after the {m['weights']} cast")


def _reference(src: Checkpoint, src_table, out_table, rec: dict, name: str) -> torch.Tensor:
    """The expected bytes of one output tensor, computed from the source alone."""
    if rec["source"] not in src_table or rec["source"] not in out_table:
        raise ConvertError(f"{name}: the manifest names source tensor {rec['source']!r}, which the model does not have")
    w_spec = src_table[rec["source"]]
    split = tuple(rec["split"]) if rec["split"] else None
    if split is not None and not (split[0] < len(w_spec.shape) and split[1] <= split[2] <= w_spec.shape[split[0]]):
        raise ConvertError(f"{name}: the manifest's split {list(split)} does not fit source tensor {rec['source']} "
                           f"{list(w_spec.shape)}")
    is_scale = name.endswith(".scale")
    out_name = rec["source"][: -len(".weight")] + ".scale" if is_scale else rec["source"]
    out_spec = out_table[out_name]
    src_fmt = w_spec.quant or ("bf16" if w_spec.dtype == "BF16" else None)
    dst_fmt = out_table[rec["source"]].quant or ("bf16" if out_table[rec["source"]].dtype == "BF16" else None)

    def read(spec, sl):
        return src.read(spec.name) if sl is None else src.read(spec.name, *sl)

    if src_fmt == dst_fmt:  # kept as published: the source slice itself
        spec = src_table[out_name]
        return read(spec, scale_split(split, spec) if is_scale else split)
    s_spec = src_table.get(rec["source"][: -len(".weight")] + ".scale")
    weight = read(w_spec, split)
    scale = read(s_spec, scale_split(split, s_spec)) if s_spec is not None else None
    values = quant.dequantize_weight(weight, scale, src_fmt)
    q, s = quant.quantize_weight(values, dst_fmt)
    out = s if is_scale else q
    if out.dtype != TORCH_DTYPES[out_spec.dtype]:
        raise ConvertError(f"{name}: reference cast gives {out.dtype}, manifest declares {out_spec.dtype}")
    return out

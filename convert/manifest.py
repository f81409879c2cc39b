"""manifest.json: the record that a conversion is complete, and how a rank loads its shards.

Schema (version 1), one per output directory, written last:

    {"format": "ascend-deploy converted DeepSeek-V4 checkpoint", "schema": 1,
     "source": "/abs/path/of/the/checkpoint", "source_files": {"model-00001-of-00046.safetensors": bytes, ...},
     "weights": "keep" | "bf16" | "int8", "world_size": W, "tp": T,
     "plan": {...plan.json...}, "config": {...config.json of the converted weights...},
     "source_config": {...config.json of the source...},
     "copied": {"tokenizer.json": sha256 hex, ...},
     "ranks": [{"rank": r, "index": "rank-0000r/model.safetensors.index.json", "slots": [[e, ...], ...],
                "files": {"rank-0000r/model-00001-of-00046.safetensors": {"sha256": hex, "bytes": n}, ...},
                "tensors": {"layers.0.attn.wq_b.weight": {"file": "rank-0000r/...", "dtype": "F8_E4M3",
                            "shape": [...], "sha256": hex, "source": "layers.0.attn.wq_b.weight",
                            "split": [dim, start, stop] | null}, ...}}, ...]}

Tensor names are official names with rank-local shapes; a rank holds `layers.L.ffn.experts.E.*` for
every distinct logical expert E in its slots of MoE layer L, and `"slots"` of its rank entry lists, per
MoE layer, the logical expert of each local slot (plan.experts_on_rank). `source` names the source
tensor and `split` the slice of it that was taken before the cast. `copied` holds the files taken over as they are
(tokenizer, generation settings), which `verify` checks too; manifests written before it have none.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ascend.errors import parse_json
from convert.errors import ConvertError
from convert.reader import safe_member

MANIFEST = "manifest.json"
SCHEMA = 1


def read_manifest(out: str | Path) -> dict:
    """The manifest of a finished conversion, or a ConvertError saying why there is none."""
    path = Path(out) / MANIFEST
    if not Path(out).is_dir():
        raise ConvertError(f"{out}: no such directory (expected the --out of an ascend convert)")
    if not path.is_file():
        raise ConvertError(f"{path}: missing; the conversion in {out} is incomplete (rerun convert with --resume)")
    try:
        m = parse_json(path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable ({e})") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or not isinstance(m.get("ranks"), list):
        raise ConvertError(f"{path}: expected an ascend-deploy manifest with schema {SCHEMA}")
    _check_fields(m, path)
    return m


# What readers of a manifest index without further checks: key -> type, at each level of the schema above.
_TOP = {"weights": str, "world_size": int, "plan": dict, "config": dict, "source_config": dict}
_RANK = {"rank": int, "files": dict, "tensors": dict}
_FILE = {"sha256": str, "bytes": int}
_TENSOR = {"file": str, "dtype": str, "shape": list, "sha256": str, "source": str}
_JSON_TYPE = {str: "string", int: "integer", dict: "object", list: "array"}


def _check_fields(m: dict, path: Path) -> None:
    """Refuse a manifest (edited by hand, or cut short) that lacks a field its readers use, naming where."""
    def need(obj: object, fields: dict, where: str) -> None:
        if not isinstance(obj, dict):
            raise ConvertError(f"{path}: {where} must be a JSON object")
        for key, kind in fields.items():
            if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
                raise ConvertError(f"{path}: {where} needs {key!r} as a JSON {_JSON_TYPE[kind]}")

    need(m, _TOP, "the manifest")
    copied = m.get("copied", {})        # absent in manifests written before it
    if not (isinstance(copied, dict) and all(isinstance(v, str) for v in copied.values())):
        raise ConvertError(f"{path}: the manifest needs 'copied' as a JSON object of file name -> sha256")
    for i, entry in enumerate(m["ranks"]):
        need(entry, _RANK, f"ranks[{i}]")
        for rel, rec in entry["files"].items():
            need(rec, _FILE, f"ranks[{i}] file {rel}")
        for name, rec in entry["tensors"].items():
            need(rec, _TENSOR, f"ranks[{i}] tensor {name}")
            split = rec.get("split")
            if split is not None and not (isinstance(split, list) and len(split) == 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in split)):
                raise ConvertError(f"{path}: ranks[{i}] tensor {name} needs 'split' as null or [dim, begin, end]")


def rank_entry(manifest: dict, rank: int, origin: str) -> dict:
    ranks = manifest["ranks"]
    if not 0 <= rank < len(ranks) or ranks[rank].get("rank") != rank:
        raise ConvertError(f"{origin}: no rank {rank} (world size {len(ranks)})")
    return ranks[rank]


def load_rank(out_dir: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict: official names, rank-local shapes, dtypes as stored (for model/ to load)."""
    out = Path(out_dir)
    entry = rank_entry(read_manifest(out), rank, str(out / MANIFEST))
    state: dict[str, torch.Tensor] = {}
    for rel in entry["files"]:
        path = safe_member(out, rel, out / MANIFEST)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    missing = set(entry["tensors"]) - set(state)
    if missing:
        raise ConvertError(f"{out}: rank {rank} files lack tensor {sorted(missing)[0]} named in the manifest")
    return state

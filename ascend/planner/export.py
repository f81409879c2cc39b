"""Exporters of a plan's expert placement to the formats other systems read, and back.

* DeepSeek EPLB arrays: `phy2log` [L, P], `log2phy` [L, E, max replicas] (-1 padded), `logcnt` [L, E],
  exactly what `eplb.rebalance_experts` returns; written as an .npz of int64 arrays (no pickles).
* vllm-ascend static expert map (`expert_map_path`): {"moe_layer_count": L, "layer_list": [{"layer_id",
  "device_count", "device_list": [{"device_id", "device_expert": [logical ids in slot order]}]}]},
  one device per EP rank, main layers only (vLLM serves the MTP layer as a separate draft model).
* The matching `vllm serve` arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ascend.errors import parse_json
from ascend.planner import placement as pl
from ascend.planner.errors import PlanError
from ascend.planner.plan import Plan

__all__ = ["eplb_arrays", "write_eplb", "read_eplb", "vllm_ascend_expert_map", "read_vllm_ascend_expert_map",
           "vllm_ascend_args"]


def eplb_arrays(plan: Plan) -> dict[str, np.ndarray]:
    return {"phy2log": plan.phy2log.copy(), "log2phy": plan.log2phy, "logcnt": plan.logcnt}


def write_eplb(plan: Plan, path: str | Path) -> None:
    """The arrays as an .npz at exactly `path` (np.savez given a name would append ".npz" to it)."""
    with open(path, "wb") as f:
        np.savez(f, **eplb_arrays(plan))


def read_eplb(path: str | Path, n_experts: int | None = None) -> np.ndarray:
    """phy2log from an EPLB .npz, after checking log2phy / logcnt agree with it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            phy2log, log2phy, logcnt = (np.asarray(z[k], dtype=np.int64) for k in ("phy2log", "log2phy", "logcnt"))
    except (OSError, KeyError, ValueError) as e:
        raise PlanError(f"{path}: cannot read EPLB arrays phy2log/log2phy/logcnt ({type(e).__name__}: {e})") from None
    E = n_experts or logcnt.shape[-1]
    if phy2log.ndim != 2 or phy2log.min() < 0 or phy2log.max() >= E:
        raise PlanError(f"{path}: phy2log must be [layers, slots] with ids in 0..{E - 1}")
    if not np.array_equal(pl.logcnt_of(phy2log, E), logcnt):
        raise PlanError(f"{path}: logcnt disagrees with phy2log")
    mine = pl.log2phy_of(phy2log, E)
    width = max(mine.shape[2], log2phy.shape[2])
    pad = lambda a: np.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2])), constant_values=-1)  # noqa: E731
    if log2phy.shape[:2] != mine.shape[:2] or not np.array_equal(np.sort(pad(mine), 2), np.sort(pad(log2phy), 2)):
        raise PlanError(f"{path}: log2phy disagrees with phy2log")
    return phy2log


def vllm_ascend_expert_map(plan: Plan) -> dict[str, Any]:
    """The static map; vllm-ascend indexes a device's experts by id, so each must appear once per device."""
    s = plan.slots_per_rank
    dup = np.flatnonzero(pl.duplicate_slots(plan.phy2log[:plan.n_layers], plan.ep))
    if dup.size:
        raise PlanError(f"MoE layer {int(dup[0])} puts two replicas of one expert on one device, which vllm-ascend's "
                        "expert map cannot express; plan with --export-vllm (keeps replicas apart) or fewer redundant slots")
    return {
        "moe_layer_count": plan.n_layers,
        "layer_list": [
            {"layer_id": layer, "device_count": plan.ep,
             "device_list": [{"device_id": r, "device_expert": plan.phy2log[layer, r * s:(r + 1) * s].tolist()}
                             for r in range(plan.ep)]}
            for layer in range(plan.n_layers)],
    }


def read_vllm_ascend_expert_map(path: str | Path) -> np.ndarray:
    """phy2log [layers, devices * slots] from a vllm-ascend expert map JSON."""
    try:
        data = parse_json(Path(path).read_text())
        layers = sorted(data["layer_list"], key=lambda x: x["layer_id"])
        rows = []
        for layer in layers:
            devices = sorted(layer["device_list"], key=lambda x: x["device_id"])
            if len(devices) != layer["device_count"] or len({len(d["device_expert"]) for d in devices}) != 1:
                raise ValueError(f"layer {layer['layer_id']}: expected device_count devices with equal slots")
            rows.append([int(e) for d in devices for e in d["device_expert"]])
        if len(rows) != data["moe_layer_count"]:
            raise ValueError("moe_layer_count disagrees with layer_list")
        return np.array(rows, dtype=np.int64)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{path}: not a vllm-ascend expert map ({type(e).__name__}: {e})") from None


def vllm_ascend_args(plan: Plan, expert_map_path: str = "expert_map.json", model_path: str = "MODEL_DIR"
                     ) -> tuple[list[str], list[str]]:
    """(`vllm serve` argument list, notes on what vLLM cannot express of this plan)."""
    notes = []
    if plan.ep != plan.world_size:
        notes.append(f"vLLM's expert parallelism spans all dp*tp = {plan.world_size} ranks; this plan has "
                     f"ep = {plan.ep}, so the exported map fits only with ep = world_size")
    eplb = {"expert_map_path": expert_map_path, "num_redundant_experts": plan.redundant}
    args = ["vllm", "serve", model_path, "--tensor-parallel-size", str(plan.tp),
            "--data-parallel-size", str(plan.dp)]
    if plan.ep > 1:
        args.append("--enable-expert-parallel")
    if plan.settings.get("context"):
        args += ["--max-model-len", str(plan.settings["context"])]
    if plan.settings.get("batch"):
        args += ["--max-num-seqs", str(-(-int(plan.settings["batch"]) // plan.dp))]
    args += ["--additional-config", json.dumps({"eplb_config": eplb}, separators=(",", ":"))]
    return args, notes

"""Hardware catalogue: accelerators and the systems built from them, as data (ascend/data/hardware.json).

A name resolves to a `Hardware`: the per-rank figures of one device (a die on 910C) plus how ranks are
grouped into nodes and the link bandwidth inside a node and across nodes (or over a SuperPoD's unified
bus). Figures and their sources are listed in docs/hardware.md. Users add entries from a YAML or JSON
file of the same shape (`load_catalogue(extra=path)`, `ascend plan --hardware-file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ascend.errors import AscendDeployError, parse_json

__all__ = ["Hardware", "HardwareError", "load_catalogue", "get_hardware", "hardware_names"]

_DEVICE_KEYS = ("description", "soc", "memory_gib", "memory_gbps", "tflops", "native_dtypes",
                "devices_per_node", "intra_node_gbps", "inter_node_gbps", "limits")


class HardwareError(AscendDeployError):
    """Unknown hardware name or malformed catalogue entry."""


@dataclass(frozen=True)
class Hardware:
    """Per-rank figures of one accelerator and the links between ranks. Bandwidths in GB/s, one direction."""

    name: str
    device: str                        # catalogue name of the accelerator
    description: str
    soc: str                           # 'A2', 'A3', 'A5', 'cuda', 'cpu'
    memory_gib: float                  # per rank
    memory_gbps: float                 # HBM bandwidth per rank
    tflops: dict[str, float]           # dense, per dtype, per rank
    native_dtypes: tuple[str, ...]
    devices_per_node: int              # ranks per node (dies on 910C)
    intra_node_gbps: float             # per rank, inside a node
    inter_node_gbps: float             # per rank, across nodes (the unified bus inside a SuperPoD)
    max_nodes: int | None = None       # fixed-size systems (SuperPoDs)
    reserve_gib: float = 2.0           # memory the runtime keeps per rank (estimate)
    limits: dict[str, Any] = field(default_factory=dict)   # fused-operator limits (ascend-npu.md section 2)
    estimates: tuple[str, ...] = ()    # figures that are our estimates, not published numbers

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def compute_dtype(self, weights: str) -> str:
        """Dtype the matmuls run in for a weight format: FP8 weights run as BF16 where FP8 is not native."""
        wanted = {"keep": "fp8", "fp8": "fp8", "int8": "int8", "bf16": "bf16"}.get(weights, "bf16")
        if wanted in self.native_dtypes and wanted in self.tflops:
            return wanted
        return "bf16" if "bf16" in self.tflops else max(self.tflops, key=self.tflops.get)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _read(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else parse_json(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())            # parser messages span lines; the error is one
        raise HardwareError(f"{path}: cannot read hardware file ({type(e).__name__}: {detail})") from None
    if not isinstance(data, dict) or not ({"devices", "systems", "limits"} & set(data)):
        raise HardwareError(f"{path}: expected a mapping with 'devices', 'systems' and/or 'limits' "
                            f"(see docs/hardware.md)")
    return data


def load_catalogue(extra: str | Path | None = None) -> dict[str, Any]:
    """The built-in catalogue, with the devices / systems / limits of `extra` (YAML or JSON) added."""
    data = json.loads(resources.files("ascend").joinpath("data/hardware.json").read_text())
    if extra is not None:
        more = _read(Path(extra))
        for section in ("devices", "systems", "limits"):
            entries = more.get(section) or {}
            if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                raise HardwareError(f"{extra}: '{section}' must be a mapping of name -> entry (a mapping)")
            data[section].update({str(name).lower(): e for name, e in entries.items()})   # names match any case
    return data


def hardware_names(catalogue: dict[str, Any] | None = None) -> list[str]:
    catalogue = catalogue or load_catalogue()
    return sorted(catalogue["devices"]) + sorted(catalogue["systems"])


def get_hardware(name: str, extra: str | Path | None = None) -> Hardware:
    """Resolve a device or system name; unknown names raise a one-line error listing the known ones."""
    catalogue = load_catalogue(extra)
    systems, devices = catalogue["systems"], catalogue["devices"]
    key = name.lower()
    if key in systems:
        system = systems[key]
        device_name = str(system.get("device", "")).lower()
        if device_name not in devices:
            raise HardwareError(f"hardware {name!r}: system names device {device_name!r}, expected one of "
                                f"{sorted(devices)}")
        entry = {**devices[device_name], **{k: v for k, v in system.items() if k != "device"}}
    elif key in devices:
        device_name, entry = key, dict(devices[key])
    else:
        raise HardwareError(f"unknown hardware {name!r}; known: {', '.join(hardware_names(catalogue))}"
                            " (add more with --hardware-file)")
    missing = [k for k in _DEVICE_KEYS if k not in entry]
    if missing:
        raise HardwareError(f"hardware {name!r}: entry lacks {missing}; see docs/hardware.md for the fields")
    limits = entry["limits"]
    if isinstance(limits, str):
        if limits.lower() not in catalogue["limits"]:
            raise HardwareError(f"hardware {name!r}: limits {limits!r}, expected one of {sorted(catalogue['limits'])}")
        limits = catalogue["limits"][limits.lower()]
    dtypes = entry["native_dtypes"]
    try:
        hw = Hardware(
            name=key, device=device_name, description=str(entry["description"]), soc=str(entry["soc"]),
            memory_gib=float(entry["memory_gib"]), memory_gbps=float(entry["memory_gbps"]),
            tflops={str(k): float(v) for k, v in entry["tflops"].items()},
            native_dtypes=tuple(dtypes) if isinstance(dtypes, list) else dtypes,   # not a list: refused below
            devices_per_node=int(entry["devices_per_node"]),
            intra_node_gbps=float(entry["intra_node_gbps"]), inter_node_gbps=float(entry["inter_node_gbps"]),
            max_nodes=int(entry["max_nodes"]) if entry.get("max_nodes") is not None else None,
            reserve_gib=float(entry.get("reserve_gib", 2.0)),
            limits=dict(limits), estimates=tuple(entry.get("estimates", ())))
    except (TypeError, ValueError, AttributeError) as e:
        raise HardwareError(f"hardware {name!r}: malformed entry ({type(e).__name__}: {e})") from None
    _check_ranges(hw, name)
    return hw


def _check_ranges(hw: Hardware, name: str) -> None:
    """Refuse figures the cost model cannot use: it divides by every rate and subtracts the reserve."""
    def need(ok: bool, field_: str, expected: str) -> None:
        if not ok:
            raise HardwareError(f"hardware {name!r}: {field_} = {getattr(hw, field_)!r}, expected {expected}")

    for field_ in ("memory_gib", "memory_gbps", "intra_node_gbps", "inter_node_gbps"):
        need(0 < getattr(hw, field_) < float("inf"), field_, "a positive number")
    need(bool(hw.tflops) and all(0 < v < float("inf") for v in hw.tflops.values()), "tflops",
         "a mapping of dtype -> positive TFLOPS")
    need(isinstance(hw.native_dtypes, tuple) and bool(hw.native_dtypes)
         and all(isinstance(d, str) for d in hw.native_dtypes), "native_dtypes", "a list of dtype names")
    need(hw.devices_per_node >= 1, "devices_per_node", "a positive integer")
    need(0 <= hw.reserve_gib < hw.memory_gib, "reserve_gib", f"in [0, memory_gib = {hw.memory_gib})")
    need(hw.max_nodes is None or hw.max_nodes >= 1, "max_nodes", "a positive integer")
    for key, value in hw.limits.items():
        form = _LIMIT_FORMS.get(key, "an integer")
        ints = value if isinstance(value, list) else [value]
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in ints) and (
            isinstance(value, list) == (form != "an integer")) and (form != "[low, high]" or len(ints) == 2)
        if not ok:
            raise HardwareError(f"hardware {name!r}: limit {key} = {value!r}, expected {form}")


# The limits that are not one integer (a maximum): ranges, and the admitted values of one setting.
_LIMIT_FORMS = {"dispatch_ep": "[low, high]", "dispatch_hidden": "[low, high]",
                "fia_heads_per_rank": "a list of integers"}

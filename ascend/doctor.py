"""`ascend doctor`: which backend this machine gives, why, and the facts the other commands depend on."""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import platform
import re

import click
import torch

from ascend.cli import device_option, json_option
from ascend.device import Device, get_device, probe_cuda, probe_npu

ENV_VARS = ("ASCEND_DEVICE", "ASCEND_RT_VISIBLE_DEVICES", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH",
            "ASCEND_OPP_PATH", "CUDA_VISIBLE_DEVICES", "TORCH_DEVICE_BACKEND_AUTOLOAD", "ASCEND_DIST_TIMEOUT_S")
DEFAULT_TOOLKIT = "/usr/local/Ascend/ascend-toolkit/latest"


def cann_version(env: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(toolkit directory, CANN version) from the toolkit's install/version info files, None where absent.

    set_env.sh exports ASCEND_TOOLKIT_HOME (older kits: ASCEND_HOME_PATH); the installer writes
    `<arch>-linux/ascend_toolkit_install.info` with `version=8.x`, and components have `version.info`.
    """
    env = os.environ if env is None else env
    home = env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_HOME_PATH") or DEFAULT_TOOLKIT
    if not os.path.isdir(home):
        return None, None
    candidates = sorted(glob.glob(os.path.join(home, "*_install.info")) +
                        glob.glob(os.path.join(home, "*", "*_install.info")))
    candidates += [os.path.join(home, d, "version.info") for d in ("", "runtime", "compiler")]
    for path in candidates:
        try:
            with open(path) as f:
                for line in f:
                    m = re.match(r"\s*version\s*=\s*(\S+)", line, re.IGNORECASE)
                    if m:
                        return home, m.group(1)
        except OSError:
            continue
    return home, None


def _package_version(name: str) -> str | None:
    """Installed distribution version without importing it (importing torch_npu may fail or be slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices(device: Device) -> list[dict]:
    if device.type == "cpu":
        mem = device.memory()
        return [{"index": 0, "name": f"{platform.machine()} host, {os.cpu_count()} cores",
                 "memory_total_bytes": mem.total, "memory_free_bytes": mem.free}]
    out = []
    for i in range(device.count):
        free, total = device.runtime.mem_get_info(i)
        out.append({"index": i, "name": device.runtime.get_device_name(i),
                    "memory_total_bytes": total, "memory_free_bytes": free})
    return out


def report(name: str | None = None) -> dict:
    """Everything `ascend doctor` shows, as plain JSON-able data. Raises DeviceError for an unusable explicit name."""
    device = get_device(name)
    toolkit, cann = cann_version()
    probes = [probe_npu(), probe_cuda()]
    return {
        "backend": device.type,
        "requested": name or os.environ.get("ASCEND_DEVICE") or "auto",
        "reason": device.reason,
        "backends": {p.backend: {"available": p.ok, "devices": p.count, "reason": p.reason} for p in probes}
                    | {"cpu": {"available": True, "devices": 1, "reason": ""}},
        "devices": _devices(device),
        "soc": device.soc,
        "collective_backend": device.collective_backend,
        "native_dtypes": [str(d).removeprefix("torch.") for d in device.native_dtypes],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "torch_npu": _package_version("torch-npu"),
                     "cann": cann, "cann_toolkit": toolkit},
        "env": {k: v for k, v in sorted(os.environ.items()) if k in ENV_VARS or k.startswith("HCCL_")},
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_table(r: dict) -> str:
    rows = [("backend", f"{r['backend']} ({r['reason']})")]
    rows += [(f"  {b}", "available, %d device(s)" % s["devices"] if s["available"] else f"unavailable: {s['reason']}")
             for b, s in r["backends"].items()]
    rows += [(f"device {d['index']}", f"{d['name']}: {_gib(d['memory_free_bytes'])} free of "
                                      f"{_gib(d['memory_total_bytes'])}") for d in r["devices"]]
    v = r["versions"]
    rows += [("soc", r["soc"]), ("collective backend", r["collective_backend"]),
             ("native dtypes", ", ".join(r["native_dtypes"])), ("python", v["python"]),
             ("torch", v["torch"] + (f" (cuda {v['torch_cuda']})" if v["torch_cuda"] else "")),
             ("torch-npu", v["torch_npu"] or "not installed"),
             ("CANN", f"{v['cann'] or 'version unknown'} at {v['cann_toolkit']}" if v["cann_toolkit"]
              else f"not found ($ASCEND_TOOLKIT_HOME unset, {DEFAULT_TOOLKIT} absent)")]
    rows += [(f"${k}", val) for k, val in r["env"].items()] or [("env", "no ASCEND_/HCCL_/CUDA_ variables set")]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{val}" for k, val in rows)


@click.command("doctor")
@device_option
@json_option
def doctor(device: str, as_json: bool) -> None:
    """Report the accelerator backend chosen and why, devices, versions."""
    r = report(device)
    click.echo(json.dumps(r, indent=2) if as_json else format_table(r))

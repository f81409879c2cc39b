"""The published schemas of torch_npu operators, read from the torch-npu wheel itself.

The wheel carries `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`, the file its own
bindings are generated from, so the schema strings there are exactly what `torch_npu.npu_xxx`
accepts. We fetch the wheel with `pip download --no-deps` (no install, nothing imported from it),
extract that one yaml into a cache directory, and keep only the yaml; the wheel is deleted.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from ascend.errors import AscendDeployError

TORCH_NPU_VERSION = "2.14.0"
YAML_IN_WHEEL = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"


class SchemaUnavailable(AscendDeployError):
    """The torch-npu wheel (and so the operator schemas) could not be obtained."""


def cache_dir() -> Path:
    """$ASCEND_DEPLOY_CACHE, else ~/.cache/ascend-deploy."""
    root = os.environ.get("ASCEND_DEPLOY_CACHE") or Path.home() / ".cache" / "ascend-deploy"
    return Path(root)


def _extract_yaml(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(YAML_IN_WHEEL)  # the one member we need, read by its fixed name (no path from the archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)  # atomic: concurrent test processes never see half a file


def schema_yaml_path(version: str = TORCH_NPU_VERSION) -> Path:
    """Path of the cached schema yaml, downloading the wheel once if needed."""
    dest = cache_dir() / f"torch_npu-{version}" / "npu_native_functions_by_codegen.yaml"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="torch-npu-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--timeout", "30", "--retries", "2", "--dest", tmp, f"torch-npu=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SchemaUnavailable(f"cannot download torch-npu=={version}: {type(e).__name__}: {e}") from e
        wheels = sorted(Path(tmp).glob("torch_npu-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SchemaUnavailable(f"cannot download torch-npu=={version} from the package registry "
                                    f"(pip download exit {proc.returncode}: {last})")
        _extract_yaml(wheels[0], dest)
    return dest


@functools.lru_cache(maxsize=None)
def load_schemas(version: str = TORCH_NPU_VERSION) -> dict[str, str]:
    """{operator name (with overload, e.g. 'npu_x.out'): schema string} for every entry of the yaml.

    The yaml lists some operators in several sections (custom, symint, ...); the first entry wins,
    later ones repeat the same schema.
    """
    doc = yaml.safe_load(schema_yaml_path(version).read_text())
    schemas: dict[str, str] = {}
    for section in doc.values():
        if not isinstance(section, list):
            continue
        for entry in section:
            func = entry.get("func") if isinstance(entry, dict) else None
            if func:
                schemas.setdefault(func.split("(", 1)[0], func)
    return schemas

"""Reading a published checkpoint: index, shard headers, lazy tensor access, validation against the config.

Everything here treats the checkpoint as untrusted input: paths named by the index must stay inside
the checkpoint directory (no `..`, no absolute paths, no symlinks leading out), every safetensors
header is parsed and bounds-checked by us before safetensors maps the file, dtypes are taken from
the header (and `expert_dtype` from config.json decides what an I8 expert weight means), and every
tensor's shape and dtype is compared with the table derived from the config before anything is
converted. Tensor data is read lazily through `safe_open` (`get_slice` for partial reads).
"""

from __future__ import annotations

import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ascend.errors import parse_json
from convert.errors import ConvertError
from convert.layout import DTYPE_BYTES, TensorSpec, expected_tensors
from convert.names import to_official
from model.config import ModelConfig

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
REMAP_BYTES = 128 << 20       # re-open a shard after this much was read through one mapping (bounds RSS)
# Every dtype code safetensors defines (so an unknown one is reported as unknown, a known-but-wrong one as wrong)
ALL_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64",
              "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
# Copies of the shared embedding / head some checkpoints store under the MTP block; the model shares them.
_SHARED_COPY = re.compile(r"mtp\.\d+\.(embed|head)\.weight")


@dataclass(frozen=True)
class StoredTensor:
    name: str          # official name
    key: str           # name as stored in the file
    file: Path
    dtype: str         # safetensors dtype code from the header
    shape: tuple[int, ...]
    begin: int         # byte offsets within the file's data section
    end: int


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse and bounds-check one safetensors header; returns (entries, data section start)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, expected an 8-byte "
                                   f"header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ConvertError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            header = parse_json(f.read(n))
    except ValueError as e:                        # not UTF-8, not JSON, nested too deeply
        raise ConvertError(f"{path}: corrupt safetensors header (not JSON: {getattr(e, 'msg', e)})") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header (expected a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        # safetensors refuses it when the file is opened, mid-conversion: refuse it here
        raise ConvertError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_bytes = size - 8 - n
    spans = []
    for key, e in header.items():
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
                and len(e["data_offsets"]) == 2
                and all(isinstance(x, int) and x >= 0 for x in e["shape"] + e["data_offsets"])):
            raise ConvertError(f"{path}: corrupt safetensors header entry for {key!r}")
        dtype = e.get("dtype")
        if dtype not in ALL_DTYPES:
            raise ConvertError(f"{path}: tensor {key} has unknown dtype {dtype!r}, expected one of "
                               f"{sorted(DTYPE_BYTES)}")
        begin, end = e["data_offsets"]
        if not begin <= end <= data_bytes:
            raise ConvertError(f"{path}: tensor {key} data [{begin}, {end}) lies outside the {data_bytes}-byte data "
                               f"section (truncated file?)")
        if dtype in DTYPE_BYTES and end - begin != _numel(e["shape"]) * DTYPE_BYTES[dtype]:
            raise ConvertError(f"{path}: tensor {key} holds {end - begin} bytes, expected "
                               f"{_numel(e['shape']) * DTYPE_BYTES[dtype]} for {dtype} {e['shape']}")
        spans.append((begin, end, key))
    spans.sort()
    at = 0
    for begin, end, key in spans:
        if begin != at:
            raise ConvertError(f"{path}: tensor {key} starts at byte {begin}, expected {at} "
                               f"(overlapping or gapped data)")
        at = end
    if at != data_bytes:
        # safetensors refuses such a file when it is opened; refuse it here, before any work is done
        raise ConvertError(f"{path}: {data_bytes - at} bytes after the last tensor (the data section must end "
                           f"where its tensors do)")
    return header, 8 + n


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def safe_member(root: Path, name: object, origin: Path, what: str = "shard") -> Path:
    """`root/name` for a file name taken from an index (or a fixed name), refusing anything that would leave
    `root`, a symbolic link pointing out of it included; `what` names the file in the error."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or os.path.isabs(name) \
            or ".." in Path(name).parts or "\x00" in name:
        raise ConvertError(f"{origin}: {what} path {name!r} must be a file name inside {root}")
    path = root / name
    if not path.is_file():
        raise ConvertError(f"{origin}: {what} {name} does not exist in {root}")
    real = path.resolve()
    if root.resolve() not in real.parents:
        raise ConvertError(f"{origin}: {what} {name} resolves to {real}, outside the checkpoint directory {root}")
    return path


class Checkpoint:
    """A checkpoint directory: config.json + model.safetensors.index.json + shards (or one model.safetensors)."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ConvertError(f"{self.root}: checkpoint directory does not exist")
        self.config = ModelConfig.from_hf(self.root / "config.json")
        self.files = self._shard_files()
        self.tensors: dict[str, StoredTensor] = {}  # official name -> where it is
        self.skipped: list[str] = []
        for file in self.files:
            header, start = read_header(file)
            for key, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                name = to_official(key)
                if _SHARED_COPY.fullmatch(name):
                    self.skipped.append(key)
                    continue
                if name in self.tensors:
                    raise ConvertError(f"{file}: tensor {key} also stored in {self.tensors[name].file.name}")
                b, en = e["data_offsets"]
                self.tensors[name] = StoredTensor(name, key, file, e["dtype"], tuple(e["shape"]), start + b, start + en)
        self._check_index()
        self._lock = threading.Lock()
        self._handles: dict[Path, list] = {}  # file -> [safe_open handle, bytes read through it]
        self._by_file: dict[Path, list[str]] | None = None

    def _shard_files(self) -> list[Path]:
        index = self.root / INDEX
        if not index.exists():
            single = self.root / "model.safetensors"
            if single.is_file():
                self.weight_map = None
                return [single]
            raise ConvertError(f"{self.root}: no {INDEX} (or model.safetensors)")
        try:
            data = parse_json(index.read_text())
            weight_map = data["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise ConvertError(f"{index}: expected JSON with a 'weight_map' object of tensor name -> file name "
                               f"strings") from None
        self.weight_map = weight_map
        files = {}                   # one entry per file, however the index spells it ("./a" and "a")
        for n in sorted(set(weight_map.values())):
            path = safe_member(self.root, n, index)
            files.setdefault(path.resolve(), path)
        return sorted(files.values(), key=lambda p: p.name)

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for key, file in self.weight_map.items():
            name = to_official(key)
            if _SHARED_COPY.fullmatch(name):
                continue
            t = self.tensors.get(name)
            if t is None or t.file.name != Path(file).name:
                raise ConvertError(f"{self.root / INDEX}: tensor {key} is mapped to {file}, "
                                   f"but that shard does not hold it")

    # ------------------------------------------------------------------ validation
    def validate(self, cfg: ModelConfig | None = None) -> dict[str, TensorSpec]:
        """Compare every tensor with the table derived from config.json; returns the table."""
        cfg = cfg or self.config
        expected = expected_tensors(cfg)
        for name, spec in expected.items():
            t = self.tensors.get(name)
            if t is None:
                raise ConvertError(f"{self.root}: tensor {name} is missing (expected {spec.dtype} {list(spec.shape)} "
                                   f"from config.json)")
            if t.dtype != spec.dtype or t.shape != spec.shape:
                raise ConvertError(f"{t.file}: tensor {t.key} is {t.dtype} {list(t.shape)}, expected {spec.dtype} "
                                   f"{list(spec.shape)} from config.json")
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            t = self.tensors[extra[0]]
            raise ConvertError(f"{t.file}: tensor {t.key} is not part of the model described by config.json "
                               f"({len(extra)} unexpected tensors)")
        return expected

    # ------------------------------------------------------------------ data
    def _handle(self, file: Path, nbytes: int):
        """An open safe_open handle for `file`, replaced after REMAP_BYTES have been read through it.

        safe_open maps the whole file; every page read stays resident (and counted in RSS) while the
        mapping lives, so long-lived handles would make memory grow to the checkpoint's size.
        """
        with self._lock:
            entry = self._handles.get(file)
            if entry is None or entry[1] > REMAP_BYTES:
                entry = self._handles[file] = [safe_open(str(file), framework="pt", device="cpu"), 0]
            entry[1] += nbytes
            return entry[0]

    def release(self, file: Path) -> None:
        """Drop the mapping of `file`."""
        with self._lock:
            self._handles.pop(file, None)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name` (official), or rows/columns [start, stop) of dimension `dim` read lazily via get_slice."""
        t = self.tensors[name]
        if dim is None:
            tensor = self._handle(t.file, t.end - t.begin).get_tensor(t.key)
        else:
            stop = t.shape[dim] if stop is None else stop
            index = [slice(None)] * len(t.shape)
            index[dim] = slice(start, stop)
            f = self._handle(t.file, (t.end - t.begin) * (stop - start) // max(1, t.shape[dim]))
            tensor = f.get_slice(t.key)[tuple(index)]
        # safe_open returns views of its file mapping, which keep every page they touched resident; a copy
        # lets the mapping go (see _handle) so memory stays bounded by the tensors in flight
        return tensor.clone()

    def in_file(self, file: Path) -> list[str]:
        """Official names stored in `file`, in storage order."""
        if self._by_file is None:
            self._by_file = {}
            for n, t in self.tensors.items():
                self._by_file.setdefault(t.file, []).append(n)
        return self._by_file.get(file, [])

"""Writing safetensors files as a stream, atomically.

A safetensors file is an 8-byte header length, a JSON header with every tensor's dtype, shape and
byte range, then the raw data. The header needs only shapes and dtypes, which are known before any
data is read, so a file is written header first and then one tensor at a time: memory holds one
tensor, never the file. Each file is written under a temporary name and renamed into place after
fsync, so a file with its final name is always complete. Contents are a pure function of the
tensors (fixed order, no timestamps), so an interrupted run that is resumed produces the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from ascend.files import sync_dir, temp_name, write_atomic
from convert.errors import ConvertError
from convert.layout import DTYPE_BYTES
from convert.reader import read_header

TORCH_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8,
                "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}
DTYPE_CODES = {v: k for k, v in TORCH_DTYPES.items()}

def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as stored in safetensors (row-major, little-endian)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def disk_error(e: OSError, path: Path) -> ConvertError:
    if e.errno == errno.ENOSPC:
        return ConvertError(f"{path}: no space left on device while writing; free space and rerun with --resume")
    return ConvertError(f"{path}: write failed ({e.strerror or e})")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Small files (indexes, manifests), whole or not at all (`ascend.files.write_atomic`)."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise disk_error(e, path) from None


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


class _BackgroundHash:
    """sha256 of a byte stream, computed on a helper thread (hashlib releases the GIL).

    Data waiting to be hashed stays referenced, so the backlog of all hashers together is capped at
    MAX_PENDING bytes: a writer that finds the cap exceeded waits for its own oldest chunk.
    """

    MAX_PENDING = 128 << 20
    _total = 0                       # bytes waiting in all hashers
    _lock = threading.Lock()

    def __init__(self):
        self._hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque = deque()   # (future, nbytes), in submission order

    def update(self, data) -> Future:
        future = self._pool.submit(self._hash.update, data)
        self._pending.append((future, len(data)))
        self._add(len(data))
        while self._pending and _BackgroundHash._total > self.MAX_PENDING:
            self._pop()
        return future

    @classmethod
    def _add(cls, n: int) -> None:
        with cls._lock:
            cls._total += n

    def _pop(self) -> None:
        future, n = self._pending.popleft()
        future.result()
        self._add(-n)

    def hexdigest(self) -> str:
        while self._pending:
            self._pop()
        self._pool.shutdown()
        return self._hash.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._add(-sum(n for _, n in self._pending))
        self._pending.clear()


class CopyBuffers:
    """A few reusable chunk buffers for copying byte ranges of source files (`SafetensorsWriter.write_range`).

    A chunk is read into a buffer, handed to the two hashers (tensor and file, on their own threads,
    in parallel: hashlib releases the GIL) and written; the buffer is reused once both hashes are
    done with it. Reusing them avoids allocating and faulting in fresh pages for every tensor, and
    bounds the memory of a copy to CHUNK x SLOTS. Chunks are small so that a chunk is still in the CPU
    cache when the hashes and the write read it (16 MiB chunks were ~25% slower here than 1-4 MiB ones).
    """

    CHUNK = 4 << 20
    SLOTS = 8

    def __init__(self):
        self._buffers = [np.empty(self.CHUNK, np.uint8) for _ in range(self.SLOTS)]
        self._busy: list[list[Future]] = [[] for _ in range(self.SLOTS)]
        self._next = 0
        self.tensor_hasher = ThreadPoolExecutor(max_workers=1)  # one thread keeps a tensor's chunks in order

    def take(self, n: int) -> tuple[memoryview, list[Future]]:
        """The next free buffer (first n bytes) and the list to put the futures still reading it in."""
        i, self._next = self._next, (self._next + 1) % self.SLOTS
        wait(self._busy[i])  # (a cancelled hash of an aborted file counts as done)
        self._busy[i] = []
        return memoryview(self._buffers[i])[:n], self._busy[i]

    def close(self) -> None:
        for busy in self._busy:
            for f in busy:
                f.cancel()
        self.tensor_hasher.shutdown()


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[dict, bytes, int]:
    """(header, the bytes the file starts with: the 8-byte length and the encoding padded to 8 bytes, data section
    bytes) of a file holding `entries` = [(name, dtype code, shape)] in that order: the file is
    len(start) + data bytes."""
    header, at = {}, 0
    for name, dtype, shape in entries:
        n = DTYPE_BYTES[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                         # padded: the data section stays 8-byte aligned
    return header, len(raw).to_bytes(8, "little") + raw, at


class SafetensorsWriter:
    """Write the tensors `entries` = [(name, dtype code, shape)] to `path`, in that order, one call each."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        self.path, self.tmp = Path(path), temp_name(Path(path))
        self.entries = list(entries)
        self.header, start, data = safetensors_header(self.entries)
        self.nbytes = len(start) + data
        self.file_hash = _BackgroundHash()
        self.tensor_hashes: dict[str, str] = {}
        self._next = 0
        try:
            self._f = open(self.tmp, "wb", buffering=0)  # large writes, no copy through a buffer
            self._write(start)
        except OSError as e:
            self.abort()
            raise disk_error(e, self.path) from None

    def _write(self, data) -> Future:
        """Write `data`; its file hash runs on the hash thread, overlapping the write and what follows."""
        future = self.file_hash.update(data)
        view = memoryview(data)
        while view:  # an unbuffered write may take only part
            view = view[self._f.write(view):]
        return future

    def write(self, name: str, tensor: torch.Tensor, digest: str | None = None) -> None:
        """Write the next tensor (it must be the next entry, with that entry's dtype and shape).

        `digest`: the tensor's sha256 if the caller already computed it (worker threads do, off this thread).
        """
        self.write_chunks(name, [tensor], tuple(tensor.shape), digest)

    def write_chunks(self, name: str, chunks, shape: tuple[int, ...] | None = None, digest: str | None = None) -> None:
        """Write the next tensor from consecutive row blocks (so a huge tensor never sits in memory whole)."""
        want, dtype, want_shape = self.entries[self._next]
        h, nbytes = (None if digest else _BackgroundHash()), 0
        for chunk in chunks:
            wrong_shape = shape is not None and shape != tuple(want_shape)
            if name != want or DTYPE_CODES.get(chunk.dtype) != dtype or wrong_shape:
                self.abort()
                raise RuntimeError(f"{self.path}: wrote {name} {chunk.dtype} {list(chunk.shape)}, expected {want} "
                                   f"{dtype} {list(want_shape)}")  # a bug in the caller, not a user error
            data = tensor_bytes(chunk)
            try:
                self._write(data)
            except OSError as e:
                self.abort()
                raise disk_error(e, self.path) from None
            if h is not None:
                h.update(data)
            nbytes += len(data)
        self._done(name, nbytes, digest or h.hexdigest())

    def write_range(self, name: str, src: Path, offset: int, nbytes: int, buffers: CopyBuffers) -> None:
        """Write the next tensor as `nbytes` bytes copied from file `src` at `offset` (a tensor stored as is).

        The bytes go through `buffers` chunk by chunk: read, hashed for the tensor and for the file on
        two threads at once, written; no tensor object, no copy beyond the read.
        """
        if name != self.entries[self._next][0]:
            self.abort()
            raise RuntimeError(f"{self.path}: wrote {name}, expected {self.entries[self._next][0]}")
        h, pool, done, busy = hashlib.sha256(), buffers.tensor_hasher, 0, []
        try:
            fd = os.open(src, os.O_RDONLY)
        except OSError as e:
            self.abort()
            raise ConvertError(f"{src}: cannot read ({e.strerror})") from None
        try:
            while done < nbytes:
                view, busy = buffers.take(min(buffers.CHUNK, nbytes - done))
                try:
                    got = os.preadv(fd, [view], offset + done)
                except OSError as e:
                    self.abort()
                    raise ConvertError(f"{src}: cannot read {name} ({e.strerror})") from None
                if got != len(view):
                    self.abort()
                    raise ConvertError(f"{src}: truncated while reading {name} (file changed during conversion?)")
                busy.append(pool.submit(h.update, view))
                busy.append(self._write(view))
                done += got
        except OSError as e:
            self.abort()
            raise disk_error(e, self.path) from None
        finally:
            os.close(fd)
        wait(busy)  # the tensor hash of the last chunk (earlier ones ran before it on the same thread)
        self._done(name, nbytes, h.hexdigest())

    def _done(self, name: str, nbytes: int, digest: str) -> None:
        begin, end = self.header[name]["data_offsets"]
        if nbytes != end - begin:
            self.abort()
            raise RuntimeError(f"{self.path}: {name} got {nbytes} bytes, expected {end - begin}")
        self.tensor_hashes[name] = digest
        self._next += 1

    def finish(self) -> str:
        """fsync, rename into place; returns the file's sha256."""
        if self._next != len(self.entries):
            self.abort()
            raise RuntimeError(f"{self.path}: {len(self.entries) - self._next} tensors were never written")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
            sync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise disk_error(e, self.path) from None
        return self.file_hash.hexdigest()

    def abort(self) -> None:
        self.file_hash.close()
        f = getattr(self, "_f", None)
        if f is not None and not f.closed:
            f.close()
        self.tmp.unlink(missing_ok=True)


def hash_file(path: Path) -> tuple[str, dict[str, str]]:
    """(sha256 of the file, sha256 of each tensor's bytes) of an existing safetensors file."""
    header, start = read_header(path)
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
    file_hash, tensors = hashlib.sha256(), {}
    with open(path, "rb") as f:
        file_hash.update(f.read(start))
        for begin, end, key in spans:
            h, left = hashlib.sha256(), end - begin
            while left:
                chunk = f.read(min(left, 64 << 20))
                if not chunk:
                    raise ConvertError(f"{path}: truncated (tensor {key})")
                h.update(chunk)
                file_hash.update(chunk)
                left -= len(chunk)
            tensors[key] = h.hexdigest()
        rest = f.read()
        file_hash.update(rest)
    return file_hash.hexdigest(), tensors

"""Conversion: read each source shard once, write every rank's share of it, atomically and resumably.

Output layout (OUT = --out):

    OUT/config.json, OUT/tokenizer*.json     config describing the converted weights; tokenizer copied
    OUT/plan.json                            the plan the shards follow
    OUT/rank-RRRRR/model-SSSSS-of-NNNNN.safetensors
                                             rank R's tensors taken from source shard S of N (sorted names)
    OUT/rank-RRRRR/model.safetensors.index.json   rank R's weight map
    OUT/manifest.json                        written last: its presence means the conversion is complete
    OUT/.convert-job.json                    what is being converted (lets --resume check it continues the same job)
    OUT/.convert.lock                        flocked while a conversion writes (`_exclusive`); stays, empty

Work goes source shard by source shard. For one shard, every rank's output file is opened with its
header already written (shapes are known from the config and plan), then the shard's tensors are
written, in a fixed order, to the ranks that need them: a tensor stored as is (whole or rows) is copied
as a byte range of the source file by the writer, chunk by chunk; one that is re-encoded or cut along
columns is read and cast by worker threads in a bounded window. Memory is therefore a few tensors and
chunk buffers, never a shard or a rank. Each output file appears under its final name only
when complete, and its bytes depend only on the source, the plan and the format, so --resume keeps the
finished files (those that still have the size and header this job writes) and redoes the rest to the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ascend.errors import parse_json
from convert.errors import ConvertError
from convert.formats import cast_linear, output_config
from convert.layout import TensorSpec, expected_tensors
from convert.manifest import MANIFEST, SCHEMA
from convert.reader import Checkpoint, safe_member
from convert.shard import Sharding, cut, scale_split
from convert.writer import (CopyBuffers, SafetensorsWriter, hash_file, safetensors_header, sha256_of,
                            write_bytes_atomic, write_json_atomic)

JOB = ".convert-job.json"
LOCK = ".convert.lock"
RANK_INDEX = "model.safetensors.index.json"
COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def rank_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


@dataclass(frozen=True)
class Unit:
    """A source tensor converted on its own, or a quantised weight together with its scale."""
    weight: TensorSpec           # source spec
    scale: TensorSpec | None     # source scale spec
    out_weight: TensorSpec       # output spec (global shape)
    out_scale: TensorSpec | None


@dataclass
class OutFile:
    rank: int
    path: str                                     # relative to OUT
    entries: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    sources: dict[str, tuple[str, list | None]] = field(default_factory=dict)  # name -> (source, split)

    @property
    def nbytes(self) -> int:
        """Its tensors' bytes (the index's total_size, the progress bar)."""
        return safetensors_header(self.entries)[2]

    @property
    def file_bytes(self) -> int:
        """The file's size once written, header included (what --dry-run reports)."""
        _, start, data = safetensors_header(self.entries)
        return len(start) + data

    def written_at(self, path: Path) -> bool:
        """Whether `path` holds this file as this job writes it, by size and header: what --resume keeps. A file
        cut short or replaced since (or a stray one under the name) is written again instead of going into the
        manifest with whatever it holds."""
        _, start, data = safetensors_header(self.entries)
        if not path.is_file() or path.stat().st_size != len(start) + data:
            return False
        with open(path, "rb") as f:
            return f.read(len(start)) == start


@dataclass(frozen=True)
class SourceRange:
    """Bytes [offset, offset + nbytes) of a source file: a tensor, or rows of one, that is written as stored."""
    file: Path
    offset: int
    nbytes: int


def _fmt(spec: TensorSpec) -> str:
    return spec.quant or ("bf16" if spec.dtype == "BF16" else "plain")


class Conversion:
    """A planned conversion of checkpoint `ckpt` for `sharding` into format `weights`."""

    def __init__(self, ckpt: Checkpoint, sharding: Sharding, weights: str):
        self.ckpt, self.sharding, self.weights = ckpt, sharding, weights
        src = ckpt.validate()
        # tokenizer and generation settings go along as they are; checked now, not after the shards are written
        self.copied = [safe_member(ckpt.root, name, ckpt.root, "file") for name in COPIED
                       if (ckpt.root / name).is_file() or (ckpt.root / name).is_symlink()]
        self.out_config = output_config(ckpt.config, weights)
        out = expected_tensors(self.out_config)
        self.units: dict[str, Unit] = {}
        for name, spec in src.items():
            if spec.quant and spec.quant.endswith("_scale"):
                continue
            stem = name[: -len(".weight")] if name.endswith(".weight") else None
            scale = src.get(f"{stem}.scale") if stem else None
            out_scale = out.get(f"{stem}.scale") if stem else None
            self.units[name] = Unit(spec, scale, out[name], out_scale)
        n = len(ckpt.files)
        self.files: list[OutFile] = []  # in writing order: source shard by source shard, rank by rank
        self.by_source: list[list[OutFile]] = []
        for i, file in enumerate(ckpt.files):
            group = []
            for rank in range(sharding.world_size):
                of = OutFile(rank, f"{rank_dir(rank)}/model-{i + 1:05d}-of-{n:05d}.safetensors")
                for name in ckpt.in_file(file):
                    if name in self.units:
                        self._add(of, self.units[name])
                if of.entries:
                    group.append(of)
            self.by_source.append(group)
            self.files += group

    def _add(self, of: OutFile, u: Unit) -> None:
        for piece in self.sharding.pieces(u.weight, of.rank):
            of.entries.append((piece.name, u.out_weight.dtype, self.sharding.local_shape(u.out_weight)))
            of.sources[piece.name] = (u.weight.name, list(piece.split) if piece.split else None)
            if u.out_scale is not None:
                sname = piece.name[: -len(".weight")] + ".scale"
                of.entries.append((sname, u.out_scale.dtype, self.sharding.local_shape(u.out_scale)))
                of.sources[sname] = (u.weight.name, list(piece.split) if piece.split else None)

    # ------------------------------------------------------------------ per-unit work (worker threads)
    def convert_unit(self, u: Unit, ranks: list[int]) -> dict[int, list[tuple]]:
        """Read one source unit once and produce every listed rank's output tensors.

        Returns {rank: [(name, tensor or SourceRange, sha256 or None)]} in writing order.
        """
        pieces = {r: self.sharding.pieces(u.weight, r) for r in ranks}
        if not any(pieces.values()):
            return {}
        if _fmt(u.weight) == _fmt(u.out_weight) and all(p.split is None or p.split[0] == 0
                                                          for ps in pieces.values() for p in ps):
            # stored as is and cut, if at all, along rows: a byte range of the source, copied (and hashed)
            # by the writer straight from the file, never made into a tensor
            return {r: [item for p in ps for item in self._ranges(u, p.name, p.split)] for r, ps in pieces.items() if ps}
        weight = self.ckpt.read(u.weight.name)
        scale = self.ckpt.read(u.scale.name) if u.scale is not None else None
        done: dict = {}
        out: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for rank, ps in pieces.items():
            for piece in ps:
                if piece.split not in done:
                    w, s = cut(weight, scale, u.scale, piece.split)
                    done[piece.split] = cast_linear(w, s, _fmt(u.weight), _fmt(u.out_weight))
                w, s = done[piece.split]
                out.setdefault(rank, []).append((piece.name, w))
                if u.out_scale is not None:
                    out[rank].append((piece.name[: -len(".weight")] + ".scale", s))
        # hash here, in the worker, so the writing thread only writes (and hashes whole files)
        digests = {id(t): sha256_of(t) for tensors in out.values() for _, t in tensors}
        return {r: [(n, t, digests[id(t)]) for n, t in tensors] for r, tensors in out.items()}

    def _ranges(self, u: Unit, name: str, split: tuple[int, int, int] | None) -> list[tuple]:
        """The source bytes of one piece (dim-0 split or whole) of `u`: weight, then scale if any."""
        out = [(name, self._range(u.weight, split), None)]
        if u.scale is not None:
            out.append((name[: -len(".weight")] + ".scale",
                        self._range(u.scale, scale_split(split, u.scale)), None))
        return out

    def _range(self, spec: TensorSpec, split: tuple[int, int, int] | None) -> SourceRange:
        t = self.ckpt.tensors[spec.name]
        if split is None:
            return SourceRange(t.file, t.begin, t.end - t.begin)
        row = (t.end - t.begin) // t.shape[0]  # row-major: rows [a, b) are one contiguous byte range
        return SourceRange(t.file, t.begin + split[1] * row, (split[2] - split[1]) * row)

    # ------------------------------------------------------------------ identity, dry run
    def identity(self, plan_dict: dict) -> dict:
        """What --resume checks it continues: the source's files by size and modification time (a checkpoint
        replaced by another of the same sizes is a different job), the output format and the plan."""
        stats = {f.name: f.stat() for f in self.ckpt.files}
        return {"schema": 2, "source": str(self.ckpt.root.resolve()),
                "source_files": {name: st.st_size for name, st in stats.items()},
                "source_mtime_ns": {name: st.st_mtime_ns for name, st in stats.items()},
                "weights": self.weights, "plan": plan_dict}

    def check_out(self, out: Path, plan_dict: dict, resume: bool = False) -> None:
        """Refuse an `out` this job may not write to (`_check_out`): also what --dry-run checks."""
        _check_out(Path(out), self.identity(plan_dict), resume)

    def summary(self) -> list[dict]:
        """Per rank: files, tensors and bytes it gets (what --dry-run prints)."""
        ranks = []
        for rank in range(self.sharding.world_size):
            mine = [f for f in self.files if f.rank == rank]
            ranks.append({"rank": rank, "files": len(mine), "tensors": sum(len(f.entries) for f in mine),
                          "bytes": sum(f.file_bytes for f in mine),
                          "tensor_list": [[n, d, list(s)] for f in mine for n, d, s in f.entries]})
        return ranks

    # ------------------------------------------------------------------ run
    def run(self, out: Path, plan_dict: dict, resume: bool = False, workers: int = 2, progress: bool = True) -> dict:
        """Write everything under `out`; returns the manifest. One conversion at a time per `out` (`_exclusive`)."""
        out, ident = Path(out), self.identity(plan_dict)
        _check_out(out, ident, resume)
        with _exclusive(out):
            return self._run(out, ident, plan_dict, resume, workers, progress)

    def _run(self, out: Path, ident: dict, plan_dict: dict, resume: bool, workers: int, progress: bool) -> dict:
        _prepare(out, ident, resume)
        for rank in range(self.sharding.world_size):
            (out / rank_dir(rank)).mkdir(exist_ok=True)
        hashes: dict[str, tuple[str, dict[str, str]]] = {}
        todo = []
        for group in self.by_source:
            left = []
            for of in group:
                if of.written_at(out / of.path):
                    hashes[of.path] = hash_file(out / of.path)  # finished by an earlier run
                else:
                    left.append(of)
            todo.append(left)
        total = sum(of.nbytes for group in todo for of in group)
        buffers = CopyBuffers()
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                      disable=not progress, dynamic_ncols=True) as bar, \
                    ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for file, group in zip(self.ckpt.files, todo):
                    if group:
                        self._write_group(out, file, group, pool, max(1, workers) + 1, hashes, bar, buffers)
        finally:
            buffers.close()
        return self._finish(out, ident, plan_dict, hashes)

    def _write_group(self, out, file, group, pool, window, hashes, bar, buffers: CopyBuffers) -> None:
        writers = {of.rank: SafetensorsWriter(out / of.path, of.entries) for of in group}
        ranks = sorted(writers)
        pending: deque = deque()

        def drain_one() -> None:
            for rank, tensors in pending.popleft().result().items():
                for tname, t, digest in tensors:
                    if isinstance(t, SourceRange):
                        writers[rank].write_range(tname, t.file, t.offset, t.nbytes, buffers)
                        bar.update(t.nbytes)
                    else:
                        writers[rank].write(tname, t, digest)
                        bar.update(t.numel() * t.element_size())

        try:
            for name in self.ckpt.in_file(file):
                if name in self.units:
                    pending.append(pool.submit(self.convert_unit, self.units[name], ranks))
                    if len(pending) >= window:
                        drain_one()
            while pending:
                drain_one()
            for of in group:
                hashes[of.path] = (writers[of.rank].finish(), writers[of.rank].tensor_hashes)
            self.ckpt.release(file)
        except BaseException:
            for p in pending:
                p.cancel()
            for w in writers.values():
                w.abort()
            raise

    def _finish(self, out: Path, ident: dict, plan_dict: dict, hashes) -> dict:
        ranks = []
        for rank in range(self.sharding.world_size):
            mine = [f for f in self.files if f.rank == rank]
            weight_map = {n: Path(f.path).name for f in mine for n, _, _ in f.entries}
            index = {"metadata": {"rank": rank, "world_size": self.sharding.world_size,
                                  "total_size": sum(f.nbytes for f in mine)}, "weight_map": weight_map}
            write_json_atomic(out / rank_dir(rank) / RANK_INDEX, index)
            tensors = {}
            for f in mine:
                for n, dtype, shape in f.entries:
                    src, split = f.sources[n]
                    tensors[n] = {"file": f.path, "dtype": dtype, "shape": list(shape), "sha256": hashes[f.path][1][n],
                                  "source": src, "split": split}
            ranks.append({"rank": rank, "index": f"{rank_dir(rank)}/{RANK_INDEX}",
                          "slots": [list(layer[rank]) for layer in self.sharding.slots],
                          "files": {f.path: {"sha256": hashes[f.path][0], "bytes": (out / f.path).stat().st_size}
                                    for f in mine},
                          "tensors": tensors})
        write_json_atomic(out / "config.json", self.out_config.to_hf_dict())
        write_json_atomic(out / "plan.json", plan_dict)
        copied = {}
        for src in self.copied:
            data = src.read_bytes()
            write_bytes_atomic(out / src.name, data)
            copied[src.name] = hashlib.sha256(data).hexdigest()
        manifest = {"format": "ascend-deploy converted DeepSeek-V4 checkpoint", "schema": SCHEMA,
                    "source": ident["source"], "source_files": ident["source_files"],
                    "weights": self.weights, "world_size": self.sharding.world_size, "tp": self.sharding.tp,
                    "plan": plan_dict, "config": self.out_config.to_hf_dict(),
                    "source_config": self.ckpt.config.to_hf_dict(), "copied": copied, "ranks": ranks}
        write_json_atomic(out / MANIFEST, manifest)
        (out / JOB).unlink(missing_ok=True)
        return manifest


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold `out`'s lock while a conversion writes there: a second `ascend convert` into the same directory is
    refused at once (it would delete this one's partial files, write the same temporary names, and two fresh runs
    could both find the directory empty). An flock, so a killed run leaves no stale lock."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    with open(path, "a") as f:        # the file stays: removing it would let two later runs lock two inodes
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConvertError(f"{out}: another ascend convert is writing here (it holds {path.name})") from None
        except OSError as e:          # a file system without flock (some Lustre / FUSE mounts): go on unlocked
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise
            print(f"warning: {out}: no file locks on this file system ({e.strerror}); do not run two conversions "
                  f"into it at once", file=sys.stderr)
        yield


def _check_out(out: Path, ident: dict, resume: bool) -> bool:
    """Whether `out` may take this job: False when it is empty (or absent), True when it holds an interrupted run
    of this very job (--resume); else a ConvertError. Reads only: `run` asks before it takes the lock too, so a
    refused run leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    existing = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if not existing:
        return False
    job = out / JOB
    if not resume:
        raise ConvertError(f"{out}: output directory is not empty (holds {existing[0]}); use an empty directory, "
                           f"or --resume to finish an interrupted conversion")
    if (out / MANIFEST).exists() and not job.exists():
        raise ConvertError(f"{out}: already holds a complete conversion (manifest.json); nothing to resume")
    try:
        previous = parse_json(job.read_text())
    except (OSError, ValueError):
        raise ConvertError(f"{out}: holds files but no readable {JOB}; "
                           f"it is not an interrupted conversion") from None
    if not isinstance(previous, dict):
        raise ConvertError(f"{job}: expected a JSON object; it is not an interrupted conversion")
    if previous.get("schema") != ident["schema"]:
        raise ConvertError(f"{job}: written by another version of ascend-deploy (job schema "
                           f"{previous.get('schema')!r}, this one writes {ident['schema']}); empty {out} and "
                           f"convert again")
    if previous != ident:
        diff = [k for k in ident if previous.get(k) != ident[k]] + sorted(set(previous) - set(ident))
        raise ConvertError(f"{out}: --resume of a different job ({diff[0]} differs from the interrupted run)")
    return True


def _prepare(out: Path, ident: dict, resume: bool) -> None:
    """Under the lock: check `out` again (`_check_out`), then clear an interrupted run's partial files or record
    the job in an empty directory."""
    if _check_out(out, ident, resume):
        for p in out.rglob(".*.partial"):
            p.unlink()
    else:
        write_json_atomic(out / JOB, ident)

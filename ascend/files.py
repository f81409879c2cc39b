"""Whole-or-nothing writes of small files (plan.json, a conversion's indexes and manifest): the bytes go to a
hidden temporary name in the same directory, are fsynced, then renamed over the target, so a crash or a full disk
never leaves a half-written file under the real name; the directory is fsynced after the rename, so that the rename
itself survives a power loss before a later file's (a manifest must not outlive the shards it lists)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def temp_name(path: Path) -> Path:
    """Where `path` is written before its rename (`.NAME.partial`, next to it)."""
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` as described above; an OSError leaves no temporary file behind and is re-raised for
    the caller to name in its own error."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_dir(path.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def sync_dir(path: Path) -> None:
    """fsync the directory `path`, making the renames into it durable; file systems that cannot fsync a directory
    (EINVAL / ENOTSUP, some network mounts) are left as they are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)

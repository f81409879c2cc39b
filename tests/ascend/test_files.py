"""ascend/files.py: whole-or-nothing small files, and the directory fsync that makes their renames durable."""

import errno
import os
import stat

import pytest

from ascend import files


def _recording_fsyncs(monkeypatch) -> list[str]:
    """Record what each os.fsync call syncs: 'dir' or 'file'."""
    seen, real = [], os.fsync

    def fsync(fd):
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_write_atomic_syncs_the_file_then_its_directory(tmp_path, monkeypatch):
    seen = _recording_fsyncs(monkeypatch)
    files.write_atomic(tmp_path / "plan.json", b"{}")
    assert (tmp_path / "plan.json").read_bytes() == b"{}" and seen == ["file", "dir"]
    assert not files.temp_name(tmp_path / "plan.json").exists()


@pytest.mark.parametrize("code,kept", [(errno.EINVAL, True), (errno.EIO, False)])
def test_directory_sync_is_skipped_only_where_the_file_system_cannot(tmp_path, monkeypatch, code, kept):
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    if kept:
        files.write_atomic(tmp_path / "a", b"x")
        assert (tmp_path / "a").read_bytes() == b"x"
    else:
        with pytest.raises(OSError):
            files.write_atomic(tmp_path / "a", b"x")
        assert not files.temp_name(tmp_path / "a").exists()

"""ratlib.io.write_atomic: the one atomic writer behind configs, doctor --fix, synthetic data and checkpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ratlib.io import TMP_PREFIX, write_atomic


def test_writes_bytes_text_and_callables_creating_the_folder(tmp_path: Path) -> None:
    assert write_atomic(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_atomic(tmp_path / "t.txt", "é\n").read_text(encoding="utf-8") == "é\n"
    write_atomic(tmp_path / "c.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "c.bin").read_bytes() == b"abc"
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")

    def fail(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_before_rename_sees_the_complete_temporary(tmp_path: Path) -> None:
    seen: list[bytes] = []
    write_atomic(tmp_path / "x", b"payload", before_rename=lambda tmp: seen.append(tmp.read_bytes()))
    assert seen == [b"payload"] and (tmp_path / "x").read_bytes() == b"payload"


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_get_the_permissions_open_would_give(tmp_path: Path, umask: int) -> None:
    # A bare temporary file is 0o600: a checkpoint or results file written that way is unreadable by the
    # rest of the team on a shared file system. The file gets 0o666 less the umask, as open() gives.
    old = os.umask(umask)
    try:
        written = write_atomic(tmp_path / f"m{umask:o}.json", b"{}")
        plain = tmp_path / f"plain{umask:o}.json"
        plain.write_bytes(b"{}")
        assert os.umask(umask) == umask  # the writer left the umask as it found it
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask

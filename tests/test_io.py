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


def test_append_jsonl_writes_one_line_per_record_and_reads_them_back(tmp_path: Path) -> None:
    from ratlib.io import append_jsonl, read_jsonl

    path = tmp_path / "sub" / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5})
    append_jsonl(path, {"step": 2, "loss": float("nan")})
    assert path.read_text(encoding="utf-8").count("\n") == 2
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] != rows[1]["loss"]


def test_read_jsonl_skips_a_cut_off_last_line_but_not_a_broken_middle_one(tmp_path: Path) -> None:
    from ratlib.errors import RatlibError
    from ratlib.io import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(RatlibError, match="line 2 is not JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []

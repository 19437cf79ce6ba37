"""ratlib._atomic.write_atomic: the one atomic writer behind configs, doctor --fix, synthetic data and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratlib._atomic import TMP_PREFIX, write_atomic


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

"""Files that a crash never leaves half-written: ``write_atomic`` (temp file, fsync, rename) and
``append_jsonl`` (one line per ``write``, fsynced; readers skip a cut-off last line)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ratlib.errors import RatlibError, message

__all__ = ["TMP_PREFIX", "JsonlError", "append_jsonl", "fsync_dir", "read_jsonl", "write_atomic"]


class JsonlError(RatlibError, ValueError):
    """A JSON-lines file has a broken line that is not the last one (not a cut-off write)."""


TMP_PREFIX = ".tmp-"  # temporary files start with this; readers that list folders skip them


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | str | Callable[[IO[bytes]], object],
    *,
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function given the open binary file) to ``path``.

    The bytes go to a temporary file in the same folder, which is fsynced and renamed over ``path``;
    the folder is then fsynced. A process killed at any point leaves ``path`` as it was or complete.
    The file gets the permissions ``open()`` would give a new file (0o666 less the umask), not the
    owner-only 0o600 of a bare temporary file, so teammates can read shared checkpoints and results.
    On an exception the temporary file is removed and the exception propagates. ``before_rename`` is
    a test hook, called with the temporary path just before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    tmp = Path(name)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no fchmod and no mode bits to fix
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path``, in one ``write``, then fsync.

    A process killed mid-write leaves at most a cut-off last line, which ``read_jsonl`` skips. Call it
    from one rank (the main one): appends from several processes to one file may interleave.
    """
    line = json.dumps(record, allow_nan=True) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a missing file is empty and a cut-off last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # the last line, cut off by a crash mid-write
                break
            raise JsonlError(
                message(
                    f"{path}: line {i + 1} is not JSON ({exc.msg})",
                    got=repr(line[:80]),
                    fix="only the last line may be cut off; repair or remove that line",
                )
            ) from None
    return records

"""One way to write a file so that a crash never leaves it half-written: temp file, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"  # temporary files start with this; readers that list folders skip them


def _umask() -> int:
    """The process umask: from /proc on Linux (Umask: line, kernel 4.7+); elsewhere by setting and restoring it,
    which briefly changes it for the other threads too, the only portable way."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
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
    data: bytes | str | Callable[[IO[bytes]], None],
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

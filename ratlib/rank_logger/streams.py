"""Where records go besides the console: ``rank{R}.log`` (one process per file), the other ranks' ``sys.stdout``
turned into records; and the checks of ``setup_logging``'s level and folder arguments.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ratlib.errors import RatlibError, message
from ratlib.rank_logger.state import current_rank

__all__ = ["LogDirError", "LogLevelError"]


class LogDirError(RatlibError, OSError):
    """``setup_logging(log_dir=...)``: the folder cannot be created or written."""

    __module__ = "ratlib.rank_logger"  # tracebacks name it as users import it


class LogLevelError(RatlibError, ValueError):
    """``setup_logging``: a level that is not a logging level, or ``other_ranks`` below ``level``."""

    __module__ = "ratlib.rank_logger"  # tracebacks name it as users import it


class _RankFileHandler(logging.FileHandler):
    """``rank{R}.log``, opened at the first record, flushed on each one, exclusive to one process."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        super().__init__(log_dir / "rank-pending.log", mode="a", encoding="utf-8", delay=True)

    def _open(self) -> Any:
        rank, _ = current_rank()
        name = f"rank{rank}" if rank >= 0 else "rank-unknown"
        self.baseFilename = str(self.log_dir / f"{name}.log")
        stream = open(self.baseFilename, self.mode, encoding=self.encoding)
        if not _try_lock(stream):
            stream.close()
            taken = self.baseFilename
            self.baseFilename = str(self.log_dir / f"{name}.dup-pid{os.getpid()}.log")
            print(
                f"ratlib.rank_logger: {taken} is already being written by another live process, so two "
                f"processes claim rank {rank}; this one (pid {os.getpid()}) writes {self.baseFilename} instead. "
                "Check the launcher: every process needs its own RANK.",
                file=sys.stderr,
            )
            stream = open(self.baseFilename, self.mode, encoding=self.encoding)
        return stream


def _try_lock(stream: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, no detection
        return True
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _level(value: int | str, arg: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        number = logging.getLevelName(value.strip().upper())
        if isinstance(number, int):
            return number
    names = ", ".join(logging.getLevelName(n) for n in (10, 20, 30, 40, 50))
    raise LogLevelError(
        message(f"setup_logging: {arg}={value!r} is not a logging level", expected=f"one of {names}, or an int")
    )


def _writable_dir(log_dir: str | os.PathLike[str]) -> Path:
    """``log_dir``, created, after writing a file in it: a folder that takes no files fails here, at set-up
    (``os.access`` says yes to root everywhere, also on /proc), not at the first log call."""
    directory = Path(log_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LogDirError(
            exc.errno,
            message(
                f"setup_logging: log_dir={os.fspath(log_dir)!r} cannot be created ({exc.strerror})",
                fix="pass a writable folder, or log_dir=None",
            ),
        ) from None
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".ratlib-log-probe-"):
            pass
    except OSError as exc:
        raise LogDirError(
            exc.errno,
            message(
                f"setup_logging: log_dir={os.fspath(log_dir)!r} is not writable ({exc.strerror})",
                fix="pass a writable folder, or log_dir=None",
            ),
        ) from None
    return directory


class _OtherRanksStdout:
    """``sys.stdout`` under ``setup_logging(other_ranks_stdout=False)``: the main rank (and an unknown rank,
    which prints everything) writes through; another rank's complete lines become INFO records of
    ``py.stdout``, which its console drops and its file keeps. The rank is read at each write, so a rank
    learnt only from ``init_process_group`` is honoured. Everything else (``fileno``, ``buffer``, ...) is
    the real stream's: output written to the file descriptor or ``sys.stdout.buffer`` is not caught."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self._pending = ""
        self._lock = threading.RLock()
        self._inside = threading.local()  # a handler writing to sys.stdout must not loop back here

    def write(self, text: str) -> int:
        """Write through on the main rank; log the complete lines on the others."""
        if current_rank()[0] <= 0:
            return self.original.write(text)
        if getattr(self._inside, "active", False):
            return len(text)  # a handler of ours that writes to sys.stdout: the record is logged already
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            self._inside.active = True
            try:
                for line in lines:
                    logging.getLogger("py.stdout").info("%s", line, stacklevel=2)  # the file names the caller
            finally:
                self._inside.active = False
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """``write`` each."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Flush the real stream (a partial line on another rank waits for its newline)."""
        self.original.flush()

    def isatty(self) -> bool:
        """The real stream's answer on the main rank; False elsewhere (nothing reaches a terminal)."""
        return bool(self.original.isatty()) if current_rank()[0] <= 0 else False

    def __getattr__(self, name: str) -> Any:
        # through __dict__: before __init__ (a copy being built) getattr(None, name) fails, without recursion
        return getattr(self.__dict__.get("original"), name)

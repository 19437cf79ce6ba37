"""Stack dumps: ``faulthandler`` writes every thread's stack from its C signal handler (so it works while the
main thread is blocked in a C++ collective), a small thread copies it into the rank's log; and where a
thread is, in a line short enough for a table.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import select
import socket
import sys
import sysconfig
import tempfile
import threading
from functools import cache
from types import FrameType

from ratlib.errors import message
from ratlib.hang.state import _S, HangInstallError, _signame, log
from ratlib.rank_logger import rank_tag

__all__ = ["dump_stacks"]

# ----------------------------------------------------------------------------------------------
# Stack dumps


def _register_signal(signum: int) -> None:
    """faulthandler writes into a pipe from its C handler; a thread copies each dump into the log."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # a full pipe drops the dump's tail instead of blocking the handler
    with contextlib.suppress(Exception):
        import fcntl

        fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    try:
        faulthandler.register(signum, file=write_fd, all_threads=True, chain=False)
    except (RuntimeError, ValueError, OSError) as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise HangInstallError(
            message(
                f"hang.install: cannot dump stacks on signal {signum}",
                got=str(exc),
                fix="choose a user signal such as 'SIGUSR2'",
            )
        ) from exc
    _S.signum, _S.pipe = signum, (read_fd, write_fd)
    _S.tee = threading.Thread(
        target=_copy_dumps, args=(read_fd, _signame(signum)), name="ratlib-hang-dump", daemon=True
    )
    _S.tee.start()


def _copy_dumps(read_fd: int, signame: str) -> None:
    try:
        while True:
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                return
            parts = [chunk]
            while select.select([read_fd], [], [], 0.2)[0]:  # one dump: everything until a short pause
                more = os.read(read_fd, 1 << 16)
                if not more:
                    break
                parts.append(more)
            text = b"".join(parts).decode("utf-8", "replace")
            log.warning(
                "%s stack dump on %s (pid %d on %s); the process goes on. All threads, most recent call first:\n%s",
                rank_tag(),
                signame,
                os.getpid(),
                socket.gethostname(),
                _name_threads(text),
            )
    finally:
        os.close(read_fd)


def _stack_text() -> str:
    with tempfile.TemporaryFile() as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        return _name_threads(f.read().decode("utf-8", "replace"))


def _name_threads(text: str) -> str:
    """faulthandler names threads by id only: add the Python thread names, leave out ratlib.hang's own."""
    names = {t.ident: t.name for t in threading.enumerate()}
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text.strip("\n"))
    kept = []
    for block in blocks:
        m = re.match(r"(Current thread|Thread) (0x[0-9a-fA-F]+)", block)
        name = names.get(int(m.group(2), 16)) if m else None
        if name and name.startswith("ratlib-hang-"):
            continue
        kept.append(block.replace(m.group(0), f"{m.group(0)} [{name}]", 1) if m and name else block)
    return "\n".join(kept).rstrip("\n") + "\n"


def dump_stacks(reason: str = "on request") -> None:
    """Log every thread's stack now (WARNING, into the rank log and stderr)."""
    log.warning(
        "%s stack dump %s (pid %d on %s). All threads, most recent call first:\n%s",
        rank_tag(),
        reason,
        os.getpid(),
        socket.gethostname(),
        _stack_text(),
    )


# ----------------------------------------------------------------------------------------------
# Where a thread is


@cache
def _is_library(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return True
    roots = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ratlib/
    path = os.path.abspath(filename)
    return any(r and path.startswith(os.path.join(r, "")) for r in roots)


def _short(filename: str) -> str:
    """A path short enough for a table: relative to site-packages, the stdlib or the working directory."""
    path = os.path.abspath(filename)
    paths = sysconfig.get_paths()
    for root in (paths["purelib"], paths["platlib"], paths["stdlib"], os.getcwd()):
        if path.startswith(os.path.join(root, "")):
            return os.path.relpath(path, root)
    return path


def _describe(frame: FrameType) -> str:
    code = frame.f_code
    return f"{_short(code.co_filename)}:{frame.f_lineno} in {getattr(code, 'co_qualname', code.co_name)}"


def _locate(frame: FrameType | None) -> tuple[str, str]:
    """(innermost frame, innermost frame in the user's code) of a thread's stack."""
    if frame is None:
        return "?", "?"
    f: FrameType | None = frame
    while f is not None and _is_library(f.f_code.co_filename):
        f = f.f_back
    return _describe(frame), _describe(f if f is not None else frame)


def _main_frame() -> FrameType | None:
    return sys._current_frames().get(threading.main_thread().ident or -1)

"""What the parts of ``ratlib.hang`` share: the errors, the installed state, signal names, and the process
group's store (looked up, never imported: torch is not loaded here).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from ratlib import comm
from ratlib.errors import RatlibError, message
from ratlib.launch import process_group, rank_state
from ratlib.rank_logger import get_logger, rank_tag

__all__ = [
    "CollectiveMismatchError",
    "HANG_EXIT_CODE",
    "HangError",
    "HangInstallError",
    "installed_dump_signal",
    "is_installed",
]

HANG_EXIT_CODE = 124  # like coreutils `timeout`: the process ended because it made no progress

_PREFIX = "ratlib/hang/"
_REPORT_WINDOW_CAP = 60.0  # the longest a stalled rank waits for the others' reports
_EXIT_WAIT = 5.0  # rank 0 (usually the store's host) waits this long for the others to finish with it

log = get_logger("ratlib.hang")


class HangError(RatlibError, RuntimeError):
    """A rank made no progress (no ``heartbeat``) for ``stall_timeout`` seconds."""

    __module__ = "ratlib.hang"  # tracebacks name it as users import it

    exit_code = HANG_EXIT_CODE


class CollectiveMismatchError(RatlibError, RuntimeError):
    """Ranks reached different ratlib collectives (operation, call site or step) at the same point."""

    __module__ = "ratlib.hang"  # tracebacks name it as users import it


class HangInstallError(RatlibError, ValueError):
    """``hang.install`` was given a ``stall_timeout`` or ``dump_signal`` it cannot use."""

    __module__ = "ratlib.hang"  # tracebacks name it as users import it


# ----------------------------------------------------------------------------------------------
# Installed state


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.stall_timeout: float | None = None
        self.abort = True
        self.check = False
        self.signum: int | None = None
        self.pipe: tuple[int, int] | None = None
        self.tee: threading.Thread | None = None
        self.watchdog: threading.Thread | None = None
        self.stop = threading.Event()
        self.finished = threading.Event()  # the watchdog has done its reporting
        self.watch_store: Any = None
        self.check_store: Any = None
        self.had_group = False  # a process group existed while the watchdog ran
        self.seq = 0  # ratlib collectives checked so far (the same on every rank while they agree)


_S = _State()
_LOCK = threading.Lock()


def is_installed() -> bool:
    """Whether ``install()`` is in force in this process."""
    return _S.installed


def installed_dump_signal() -> int | None:
    """The signal that dumps stacks while ``install()`` is in force, else None (read by ``ratlib.preempt``)."""
    return _S.signum if _S.installed else None


def _signal_number(value: str | int | signal.Signals | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return int(value)
    name = str(value).strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    number = getattr(signal, name, None)
    if isinstance(number, int):
        return int(number)
    if value == "SIGUSR2" and sys.platform == "win32":  # pragma: no cover - no user signals on Windows
        return None
    raise HangInstallError(
        message(
            f"hang.install: dump_signal={value!r} is not a signal on this platform",
            fix="use e.g. 'SIGUSR2', or None for no signal handler",
        )
    )


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ----------------------------------------------------------------------------------------------
# Process group and store (never imports torch)


_group = process_group  # the one definition is ratlib.launch's


def _world() -> int:
    return max(rank_state().world_size, 1)


def _default_store() -> Any | None:
    dist = _group()
    if dist is None:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, ValueError, KeyError, RuntimeError):
        return None


def _clone_store() -> Any | None:
    """A store client for this thread's own use (a TCPStore client is not shared across threads)."""
    store = _default_store()
    if store is None:
        return None
    try:
        return store.clone()
    except Exception:  # a store type without clone(): share the default client
        return store


def _require_store(what: str) -> Any | None:
    store = _clone_store()
    if store is None and _world() > 1:
        raise comm.NoProcessGroupError(
            message(
                f"hang.install: {what} needs the process group's store, but "
                f"{'torch.distributed is not initialised' if _group() is None else 'none was found'} on {rank_tag()}",
                fix="call install() after init_distributed(), or pass init_distributed(check_collectives=True)",
            )
        )
    return store

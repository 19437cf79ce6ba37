"""Hang diagnostics: which rank is stuck where, from the logs alone.

Off unless asked. ``install()`` turns on, per process:

- a stack dump on ``dump_signal`` (SIGUSR2; SIGUSR1 belongs to ``ratlib.preempt``): ``faulthandler``
  writes every thread's Python stack from its C signal handler, so it works while the main thread is
  blocked inside a C++ collective; a small thread copies it into the rank's log (and stderr) and the process goes on;
- with ``stall_timeout``, a watchdog thread: when ``heartbeat(step)`` has not been called for that
  long, the rank dumps its stacks, publishes its last step and innermost frame to the process
  group's store, one rank logs a summary table of every rank with the odd one marked, and every
  stalled rank ends with ``HangError`` (exit code ``HANG_EXIT_CODE``) instead of a silent wait;
- with ``check_collectives``, before each ``ratlib.comm`` collective the ranks compare the
  operation, the call site and the heartbeat step through the store and raise
  ``CollectiveMismatchError`` where they differ (a debugging aid: a few store round trips each).

``heartbeat(step)`` stores two numbers (no lock, no syscall); the watchdog thread reads them. Torch
is never imported here: the store is looked up only when ``torch.distributed`` is already loaded.

The package: ``watchdog`` (``heartbeat`` and the stall watchdog), ``dumps`` (stack dumps), ``summary`` (the
cross-rank table), ``collectives`` (the collective check), ``state`` (errors, installed state, the store); the
setup (``install``) is here. Every public name is importable from here.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import threading
from collections.abc import Callable

from ratlib import comm, dist_init
from ratlib.errors import message
from ratlib.hang.collectives import before_collective
from ratlib.hang.dumps import _register_signal, dump_stacks
from ratlib.hang.state import (
    _LOCK,
    _S,
    HANG_EXIT_CODE,
    CollectiveMismatchError,
    HangError,
    HangInstallError,
    _clone_store,
    _require_store,
    _signal_number,
    _signame,
    _world,
    installed_dump_signal,
    is_installed,
    log,
)
from ratlib.hang.summary import StallReport, format_summary
from ratlib.hang.watchdog import _watch, heartbeat

__all__ = [
    "HANG_EXIT_CODE",
    "CollectiveMismatchError",
    "HangError",
    "HangInstallError",
    "StallReport",
    "before_collective",
    "dump_stacks",
    "format_summary",
    "heartbeat",
    "install",
    "installed_dump_signal",
    "is_installed",
    "set_signal_check",
    "uninstall",
]

# ratlib.preempt registers a check that raises its SignalConflictError when a dump signal is one of its stop
# signals: preempt imports hang, never the other way round (DESIGN.md: a hook, not a sys.modules lookup)
_signal_check: Callable[[int], None] | None = None


def set_signal_check(check: Callable[[int], None] | None) -> None:
    """Register the check ``install`` runs on its dump signal (``ratlib.preempt`` registers one); None removes it."""
    global _signal_check
    _signal_check = check


def install(
    *,
    stall_timeout: float | None = None,
    dump_signal: str | int | signal.Signals | None = "SIGUSR2",
    check_collectives: bool = False,
    abort_after_dump: bool = True,
) -> None:
    """Turn on hang diagnostics for this process. Idempotent: a second call replaces the first.

    Call it after ``setup_logging`` (dumps go to the rank log) and after ``init_distributed``
    (the store is used for the summary and the collective check); ``init_distributed(stall_timeout=S)``
    calls it for you. ``dump_signal=None`` installs no signal handler. With ``abort_after_dump=False``
    a stall is reported (dump, summary) and the process goes on.
    """
    if stall_timeout is not None and (
        isinstance(stall_timeout, bool) or not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0
    ):
        raise HangInstallError(
            message(
                f"hang.install: stall_timeout={stall_timeout!r}",
                expected="a number of seconds > 0 (longer than your slowest step, e.g. 300) or None for no watchdog",
            )
        )
    signum = _signal_number(dump_signal)
    if signum is not None and _signal_check is not None:
        _signal_check(signum)
    with _LOCK:
        _teardown()
        check_store = _require_store("check_collectives=True") if check_collectives else None
        _S.stall_timeout, _S.abort = stall_timeout, abort_after_dump
        _S.check, _S.check_store = check_collectives, check_store
        _S.stop, _S.finished, _S.had_group = threading.Event(), threading.Event(), False
        if check_collectives:
            comm.set_collective_hook(before_collective)  # comm calls it; it never imports this module
        if signum is not None:
            _register_signal(signum)
        if stall_timeout is not None:
            _S.watch_store = _clone_store()
            _S.watchdog = threading.Thread(
                target=_watch, args=(_S.stop, float(stall_timeout)), name="ratlib-hang-watchdog", daemon=True
            )
            _S.watchdog.start()
        _S.installed = True
    parts = [
        f"stall watchdog {stall_timeout:g} s (armed by the first heartbeat)" if stall_timeout else "no stall watchdog",
        f"{_signame(signum)} dumps stacks" if signum else "no dump signal",
        "collective check on" if check_collectives else "collective check off",
    ]
    where = (
        ""
        if _S.watch_store is not None or stall_timeout is None or _world() == 1
        else (
            "; no process-group store yet: the cross-rank summary needs init_distributed() before a stall, "
            "otherwise each rank reports alone"
        )
    )
    log.info("ratlib.hang installed: %s%s", ", ".join(parts), where)


def uninstall() -> None:
    """Stop the watchdog, remove the signal handler and the collective check. Safe to call any time."""
    with _LOCK:
        _teardown()


def _teardown() -> None:
    _S.installed = False
    _S.check = False
    comm.set_collective_hook(None)
    _S.stop.set()
    if _S.signum is not None:
        faulthandler.unregister(_S.signum)
        _S.signum = None
    if _S.pipe is not None:
        os.close(_S.pipe[1])  # the copying thread sees end-of-file, closes the read end and ends
        _S.pipe = None
    for thread in (_S.watchdog, _S.tee):  # wait briefly, so that no report outlives uninstall()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
    _S.watchdog = _S.tee = None
    _S.watch_store = _S.check_store = None


atexit.register(lambda: _S.stop.set())  # never report a "stall" while the interpreter shuts down


dist_init.set_hang_install(install)  # init_distributed(stall_timeout=..., check_collectives=...) calls it

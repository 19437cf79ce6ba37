"""What the parts of ``ratlib.preempt`` share: exit code and environment names, the errors, signal names, the
flag the handler sets, and the deadline after which a signal no agreement took up ends the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from ratlib.errors import RatlibError, message
from ratlib.rank_logger import get_logger

__all__ = ["PREEMPT_EXIT_CODE", "PreemptError", "PreemptInputError", "SignalConflictError"]

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". Not 0, so Slurm,
# Kubernetes and torchrun do not mistake an unfinished run for a finished one; not 128+N, so it is
# told apart from a process the signal killed; listed in slurm.conf's RequeueExit it requeues the job.
PREEMPT_EXIT_CODE = 75

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
REQUEUE_COMMAND = ("scontrol", "requeue")
# How long after SIGTERM a stop that no agreement has taken up ends the process (stacks in the log first): below
# the 30 s that torchrun, Slurm (KillWait) and Kubernetes (terminationGracePeriodSeconds) wait before SIGKILL.
STOP_TIMEOUT_ENV = "RATLIB_STOP_TIMEOUT"
DEFAULT_STOP_TIMEOUT = 25.0
# Set to 0 by a process that owns the Slurm job (the ablation driver) for the runs it starts: it requeues.
NO_REQUEUE_ENV = "RATLIB_REQUEUE"
_DEFAULT_SIGNAL_LEAD = 60.0  # Slurm's --signal lead time when "@N" is left out

log = get_logger("ratlib.preempt")


class PreemptError(RatlibError, RuntimeError):
    """The stop agreement failed (a rank is gone or stuck), or ``install()`` ran off the main thread."""

    __module__ = "ratlib.preempt"  # tracebacks name it as users import it


class PreemptInputError(PreemptError, ValueError):
    """A bad argument to ``install()``: an unknown signal, ``every < 1``."""

    __module__ = "ratlib.preempt"  # tracebacks name it as users import it


class SignalConflictError(RatlibError, ValueError):
    """One signal was given both to ``ratlib.hang`` (stack dumps) and to ``ratlib.preempt`` (stop)."""

    __module__ = "ratlib.preempt"  # tracebacks name it as users import it


# ----------------------------------------------------------------------------------------------
# Signal numbers and names


def _signal_number(value: str | int, where: str = "preempt.install") -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PreemptInputError(
            message(f"{where}: a signal must be a name or a number", got=repr(value), expected="e.g. 'SIGTERM'")
        )
    if isinstance(value, int):
        try:
            return int(signal.Signals(value))
        except ValueError:
            pass
    else:
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(signal, name, None)
        if isinstance(number, signal.Signals):
            return int(number)
    raise PreemptInputError(
        message(
            f"{where}: {value!r} is not a signal on this platform",
            expected="a name such as 'SIGTERM', 'SIGUSR1', 'USR1' or a signal number",
            fix="use the signal your scheduler sends (Slurm --signal=USR1@120, Kubernetes and torchrun: SIGTERM)",
        )
    )


def signal_name(signum: int | None) -> str | None:
    """``"SIGTERM"`` for 15; None for None or 0."""
    if not signum:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ----------------------------------------------------------------------------------------------
# The handler: record the signal and its time, chain to what was there before


class _Flag:
    """Written only by the signal handler (main thread, between bytecodes), read by ``should_stop``."""

    def __init__(self) -> None:
        self.signum = 0
        self.time = 0.0


_FLAG = _Flag()


def _stop_bound(stop_timeout: float | None, signum: int) -> float | None:
    """Seconds from ``signum`` to the forced exit, or None for no bound. Unset: ``RATLIB_STOP_TIMEOUT`` (0: none),
    else 25 s after SIGTERM, which launchers follow with SIGKILL, and no bound after an early warning such as
    Slurm's ``--signal=USR1@300``, whose lead time a slow step may need."""
    if stop_timeout is None:
        text = os.environ.get(STOP_TIMEOUT_ENV, "").strip()
        if text:
            stop_timeout = _float_or_none(text)
        elif signum == signal.SIGTERM:
            stop_timeout = DEFAULT_STOP_TIMEOUT
    return stop_timeout if stop_timeout and stop_timeout > 0 else None


def _not_acted_on(signum: int, bound: float) -> None:
    """The deadline thread: no agreement took the stop up (the loop is stuck in a collective or in data loading,
    or never asks ``should_stop``). Leave every thread's stack in the rank log, then end before the SIGKILL."""
    from ratlib import hang

    name = signal_name(signum) or str(signum)
    with contextlib.suppress(Exception):  # the exit must happen whatever the dump does
        hang.dump_stacks(f"after {name}: no stop agreed within {bound:g} s")
    log.error(
        "preemption: %s came %g s ago and no stop agreement took it up (the loop is stuck, see the stacks above, or "
        "does not call should_stop); exiting with %d before the launcher's SIGKILL. No checkpoint was written for "
        "this stop. %s sets the bound (0: none)",
        name,
        bound,
        hang.HANG_EXIT_CODE,
        STOP_TIMEOUT_ENV,
        main_process_only=False,
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(hang.HANG_EXIT_CODE)


def _float_or_none(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None

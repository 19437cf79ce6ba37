"""Preemption: a signal on any rank stops every rank at the same step, after a checkpoint.

``install()`` puts a handler on SIGTERM and SIGUSR1 (by default) that only records the signal and its
time. ``should_stop(step)`` turns those per-rank flags into one decision: every ``every`` steps, one
small all-reduce (MAX) of a ``[2, world]`` int64 tensor in which each rank fills its own column with its
signal number and the time it arrived. Every rank gets the same tensor back, so every rank answers the
same at the same step, whichever rank (or ranks) got the signal, and every rank also learns who got what.
By default (``overlap``) the all-reduce is posted without waiting and read at the next agreement step, so
it adds no synchronisation point to the step; the first agreement blocks. ``Preemption.carry(step, flags)``
is the hook for other per-rank flags that must be agreed on every step (``ratlib.numerics``'s non-finite
flag): they ride in the same all-reduce, and the next ``should_stop`` reuses its answer (no second collective).
``exit()`` logs that on every rank, tears the group down, requeues the Slurm job from rank 0 where
allowed and ends the process with ``PREEMPT_EXIT_CODE``::

    pre = ratlib.preempt.install()
    for step in range(start, total):
        if pre.should_stop(step):
            save_checkpoint(step)  # every rank calls it; the main rank writes
            pre.exit()
        train_step()

What it cannot do (docs/preemption.md): a rank blocked inside a collective or a CUDA/NCCL kernel runs
no Python, so it reaches no agreement; the others wait in their next collective until the process
group's timeout and then fail (a rank that died makes gloo fail at once: "Connection closed by peer").
Torch is imported only inside the functions that need it.

The package: ``signals`` (names, the flag, errors), ``agreement`` (``Preemption``), ``slurm`` (requeue, lead
time); the handler and ``install`` are here. Every public name is importable from here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ratlib.errors import message
from ratlib.preempt.agreement import Preemption
from ratlib.preempt.signals import (  # noqa: F401
    _FLAG,
    DEFAULT_SIGNALS,
    DEFAULT_STOP_TIMEOUT,
    NO_REQUEUE_ENV,
    PREEMPT_EXIT_CODE,
    REQUEUE_COMMAND,
    STOP_TIMEOUT_ENV,
    PreemptError,
    PreemptInputError,
    SignalConflictError,
    _signal_number,
    log,
    signal_name,
)
from ratlib.preempt.slurm import check_lead_time, requeue_slurm_job

__all__ = [
    "PREEMPT_EXIT_CODE",
    "PreemptError",
    "PreemptInputError",
    "Preemption",
    "SignalConflictError",
    "check_lead_time",
    "current",
    "install",
    "installed",
    "installed_signals",
    "is_installed",
    "requeue_slurm_job",
    "uninstall",
]

_PREVIOUS: dict[int, Any] = {}  # signum -> the handler that was there before install()
_LOCK = threading.Lock()
_INSTANCE: Preemption | None = None


def _handler(signum: int, frame: Any) -> None:
    if not _FLAG.signum:  # the first signal wins: it is the one that started the countdown
        _FLAG.signum, _FLAG.time = signum, time.time()
        if _INSTANCE is not None:
            _INSTANCE._arm_deadline(signum)
    previous = _PREVIOUS.get(signum)
    if callable(previous) and previous is not signal.default_int_handler:  # SIG_DFL/SIG_IGN/None would kill us
        previous(signum, frame)


def installed_signals() -> frozenset[int]:
    """The signals ``ratlib.preempt`` handles in this process (empty when not installed)."""
    return frozenset(_PREVIOUS)


def is_installed() -> bool:
    """Whether ``install()`` is in force in this process."""
    return _INSTANCE is not None


def current() -> Preemption | None:
    """The ``Preemption`` that ``install()`` put in force in this process, or None: where the loop's own object
    is out of reach (a ``main()`` recording how its run stopped)."""
    return _INSTANCE


def _check_hang_conflict(signums: Iterable[int]) -> None:
    """Refuse a signal that ratlib.hang dumps stacks on, and register the reverse check with hang: preempt
    imports hang (a peer), hang never imports preempt."""
    from ratlib import hang

    hang.set_signal_check(_check_dump_signal)
    dump = hang.installed_dump_signal()
    if dump is not None and dump in set(signums):
        raise SignalConflictError(
            message(
                f"preempt.install: {signal_name(dump)} is already ratlib.hang's stack-dump signal",
                got=f"preempt signals {[signal_name(s) for s in signums]}, hang dump_signal={signal_name(dump)}",
                fix="give each its own signal: hang.install(dump_signal='SIGUSR2') (the default) and preempt "
                "SIGTERM/SIGUSR1",
            )
        )


def _check_dump_signal(signum: int) -> None:
    """What ``hang.install`` runs on its dump signal (registered by ``install`` here)."""
    if signum not in installed_signals():
        return
    name = signal_name(signum)
    taken = sorted(str(signal_name(s)) for s in installed_signals())
    raise SignalConflictError(
        message(
            f"hang.install: dump_signal={name} is already a ratlib.preempt stop signal",
            got=f"hang dump_signal={name}, preempt signals {taken}",
            fix="give each its own signal: hang.install(dump_signal='SIGUSR2') (the default), preempt SIGTERM/SIGUSR1",
        )
    )


# ----------------------------------------------------------------------------------------------
# install / uninstall


def install(
    signals: Sequence[str | int] = DEFAULT_SIGNALS,
    *,
    every: int = 1,
    timeout: float | None = None,
    overlap: bool = True,
    stop_timeout: float | None = None,
) -> Preemption:
    """Handle ``signals`` by setting a flag that ``Preemption.should_stop`` agrees on across ranks.

    Main thread only (Python runs signal handlers there). Idempotent: a second call with the same
    arguments returns the same ``Preemption``; with other arguments it replaces the set-up (the flag
    stays). An earlier Python handler on one of the signals is kept and called after the flag is set
    (not the default action or SIG_IGN: the default of SIGTERM/SIGUSR1 would end the process).
    ``timeout`` (seconds) bounds the agreement under nccl, where it runs on a gloo side group; under
    gloo the default group's timeout applies. With ``overlap`` (the default) each agreement's all-reduce
    is posted without waiting and read at the next agreement step, a step later, so it adds no extra
    synchronisation point to the step: a signal stops the ranks up to ``2 * every`` steps later instead
    of ``every`` (the first agreement blocks, so a signal during set-up stops at the first step).
    ``stop_timeout`` (seconds; 0: never): a signal that no agreement takes up within it ends the process with
    the stacks in the rank log (exit 124). Default: ``RATLIB_STOP_TIMEOUT``, else 25 s after SIGTERM only.
    """
    global _INSTANCE
    if threading.current_thread() is not threading.main_thread():
        raise PreemptError(
            message(
                "preempt.install: must run in the main thread, the only one where Python runs signal handlers",
                got=f"thread {threading.current_thread().name!r}",
                fix="call install() from the main thread before the training loop",
            )
        )
    if isinstance(signals, (str, int)):
        signals = (signals,)
    signums = tuple(dict.fromkeys(_signal_number(s) for s in signals))
    if not signums:
        raise PreemptInputError(message("preempt.install: no signals given", expected="e.g. ('SIGTERM',)"))
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise PreemptInputError(
            message(
                "preempt.install: every must be a whole number of steps >= 1",
                got=f"every={every!r}",
                fix="every=1 agrees at each step (a few microseconds on gloo); larger values stop up to every-1 "
                "steps later",
            )
        )
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise PreemptInputError(message("preempt.install: timeout must be > 0 seconds or None", got=repr(timeout)))
    if stop_timeout is not None and not (isinstance(stop_timeout, (int, float)) and stop_timeout >= 0):
        raise PreemptInputError(
            message("preempt.install: stop_timeout must be >= 0 seconds (0: no bound) or None", got=repr(stop_timeout))
        )
    with _LOCK:
        current = _INSTANCE
        wanted = (signums, every, timeout, bool(overlap), stop_timeout)
        have = (
            (current.signums, current.every, current.timeout, current.overlap, current.stop_timeout)
            if current
            else None
        )
        if current is not None and have == wanted:
            return current
        _check_hang_conflict(signums)
        _restore()
        for signum in signums:
            previous = signal.signal(signum, _handler)
            _PREVIOUS[signum] = previous if previous is not _handler else None
        if current is not None:
            current._disarm()
        _INSTANCE = Preemption(signums, every, timeout, bool(overlap), stop_timeout)
        if _FLAG.signum:  # a signal that came before this set-up keeps its deadline
            _INSTANCE._arm_deadline(_FLAG.signum)
    log.info(
        "ratlib.preempt installed: %s stop every rank at one step (agreement every %d step(s))",
        "/".join(signal_name(s) or "?" for s in signums),
        every,
    )
    return _INSTANCE


def _restore() -> None:
    for signum, previous in _PREVIOUS.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _PREVIOUS.clear()


def uninstall() -> None:
    """Put the earlier handlers back and forget the flag (tests, or a second training run in one process)."""
    global _INSTANCE
    with _LOCK:
        _restore()
        if _INSTANCE is not None:
            _INSTANCE._disarm()
        _INSTANCE = None
        _FLAG.signum, _FLAG.time = 0, 0.0


@contextlib.contextmanager
def installed(enabled: bool = True, **kwargs: Any) -> Iterator[Preemption | None]:
    """``install(**kwargs)`` for the length of a run (yields the ``Preemption``; None when not ``enabled``).

    At the end, when this call installed it, the earlier handlers come back (a test process, the next run in
    one process), and a signal that came after the last agreement is sent again, so that it meets the handler
    it would have met without ratlib (by default: the end of the process) and is not lost.
    """
    if not enabled:
        yield None
        return
    here = not is_installed()
    pre = install(**kwargs)
    try:
        yield pre
    finally:
        if here:
            late = pre.signal if pre.requested and pre.stop_step is None else None
            uninstall()
            if late is not None:
                log.warning("%s after the last stop agreement: passing it on", late)
                os.kill(os.getpid(), getattr(signal, late))

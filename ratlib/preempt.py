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
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ratlib import dist_init
from ratlib.errors import RatlibError, message
from ratlib.rank_logger import get_logger

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


class PreemptInputError(PreemptError, ValueError):
    """A bad argument to ``install()``: an unknown signal, ``every < 1``."""


class SignalConflictError(RatlibError, ValueError):
    """One signal was given both to ``ratlib.hang`` (stack dumps) and to ``ratlib.preempt`` (stop)."""


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
    # ratlib.hang is a peer module: look it up, never import it (it is loaded if it is installed)
    hang = sys.modules.get("ratlib.hang")
    dump = hang.installed_dump_signal() if hang is not None and hasattr(hang, "installed_dump_signal") else None
    if dump is not None and dump in set(signums):
        raise SignalConflictError(
            message(
                f"preempt.install: {signal_name(dump)} is already ratlib.hang's stack-dump signal",
                got=f"preempt signals {[signal_name(s) for s in signums]}, hang dump_signal={signal_name(dump)}",
                fix="give each its own signal: hang.install(dump_signal='SIGUSR2') (the default) and preempt "
                "SIGTERM/SIGUSR1",
            )
        )


# ----------------------------------------------------------------------------------------------
# The agreement


@dataclass(frozen=True)
class RankSignal:
    """One rank's signal as every rank learnt it at the stop step."""

    rank: int
    signal: str
    time: float  # time.time() when it arrived on that rank


class Preemption:
    """The installed handler's state and the cross-rank stop decision. Get it from ``install()``."""

    def __init__(
        self,
        signums: tuple[int, ...],
        every: int,
        timeout: float | None,
        overlap: bool = True,
        stop_timeout: float | None = None,
    ) -> None:
        self.signums = signums
        self.stop_timeout = stop_timeout  # None: DEFAULT_STOP_TIMEOUT for SIGTERM only; 0: never
        self._deadline: threading.Timer | None = None
        self.every = every
        self.timeout = timeout
        self.overlap = overlap
        self.start_step: int | None = None  # the first step this process gave should_stop
        self._steps_seen = 0  # how often the step value changed between calls: more than once, a step was done
        self._last_step: int | None = None
        self.stop_step: int | None = None  # the step every rank stopped at
        self.received: tuple[RankSignal, ...] = ()  # every rank's signal, known at the stop step
        self.latency: float | None = None  # seconds from the first signal to the agreement
        self._pending: tuple[Any, Any] | None = None  # (work, tensor) of the all-reduce in flight
        self._posted = False  # the first agreement has run (it blocks, so that set-up signals stop at once)
        self._group: Any = None
        self._group_for: Any = None
        self._carried: tuple[RankSignal, ...] | None = None  # what carry() agreed, for the next should_stop
        self._forced: str | None = None  # stop_next()'s reason
        self.requeue_allowed = True  # False after stop_next(requeue=False): exit() does not requeue

    @property
    def signal(self) -> str | None:
        """This rank's signal name (``"SIGTERM"``), or None when this rank got none."""
        return signal_name(_FLAG.signum)

    @property
    def requested(self) -> bool:
        """This rank got a signal (local, no collective)."""
        return bool(_FLAG.signum)

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a signal. A collective every ``every`` steps.

        Call it on every rank with the same ``step`` (the number of steps done so far, e.g. at the top of
        the loop). At a step not divisible by ``every`` it answers False without communicating (or True
        once the stop is agreed). With ``overlap`` the answer at an agreement step reflects the signals
        handled by the previous one. With no process group (or world size 1) it is the local flag.
        """
        if self.stop_step is not None:
            return True
        self._note(step)
        if self._forced is not None:
            self._stop_forced(step)
            return True
        if self._carried is not None:  # carry() agreed since the last call: no collective of our own
            got, self._carried = self._carried, None
            if got:
                self._stop(step, got)
            return bool(got)
        if step % self.every:
            return False
        return self._agree(step, block=not (self.overlap and self._posted))

    def carry(self, step: int, flags: Sequence[int]) -> list[list[int]]:
        """The hook for per-rank flags that must ride in the stop agreement (``ratlib.numerics``): a blocking
        agreement now whose all-reduce also carries this rank's ``flags`` (small non-negative ints, the same
        count on every rank). Returns every rank's flags, by rank, the same on every rank. The stop decision
        it reaches is what the next ``should_stop`` answers, whatever ``every``, with no collective of its
        own; a signal that comes after it is taken up by the next ``carry`` or agreement. Every rank calls it
        at the same point, like any collective."""
        import torch

        flags = [int(f) for f in flags]
        if any(f < 0 for f in flags):
            raise PreemptInputError(message("Preemption.carry: flags must be >= 0", got=repr(flags)))
        dist = _dist()
        if dist is None:
            if _FLAG.signum:
                self._carried = (RankSignal(dist_init.get_rank(), self.signal or "?", _FLAG.time),)
            elif self._carried is None:
                self._carried = ()
            return [flags]
        group = self._agreement_group(dist)
        earlier: tuple[RankSignal, ...] = ()
        if self._pending is not None:  # an overlapped agreement still in flight: finish it first
            (work, pending), self._pending = self._pending, None
            self._wait(dist, step, lambda: work.wait())
            earlier = self._signals(pending)
        buf = torch.zeros(2 + len(flags), dist.get_world_size(), dtype=torch.int64)
        buf[:2] = self._local_flags(dist)
        if flags:
            buf[2:, dist.get_rank()] = torch.tensor(flags, dtype=torch.int64)
        self._posted = True
        self._wait(dist, step, lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group))
        got = earlier or self._signals(buf)
        if got or self._carried is None:  # a stop already carried is kept until should_stop takes it
            self._carried = got
        return buf[2:].t().tolist()

    def stop_next(self, reason: str, *, requeue: bool = False) -> None:
        """Make the next ``should_stop`` answer True with no signal, and log ``reason``: for a stop every rank
        has already agreed on (``ratlib.numerics``'s ``"stop"`` policy), so every rank must call it at the same
        step. ``requeue=False``: ``exit()`` does not requeue the Slurm job (a requeued run would meet the
        same fault again)."""
        self._forced = reason
        self.requeue_allowed = self.requeue_allowed and requeue

    def _stop_forced(self, step: int) -> None:
        self._disarm()
        self.stop_step, self.received, self.latency = step, (), 0.0
        log.warning("stopping at step %d on every rank: %s", step, self._forced, main_process_only=False)

    def agree(self, step: int) -> bool:
        """A blocking agreement now, whatever ``every``: the same answer on every rank, True once any rank
        got a signal. For a point outside the step loop where a signal that came after the last
        ``should_stop`` must still stop every rank: before a long evaluation, or a final export.
        Every rank calls it at the same point, like any collective."""
        if self.stop_step is not None:
            return True
        self._note(step)
        return self._agree(step, block=True)

    def _note(self, step: int) -> None:
        if self.start_step is None:
            self.start_step = step
        if step != self._last_step:
            self._steps_seen, self._last_step = self._steps_seen + 1, step

    def _agree(self, step: int, *, block: bool) -> bool:
        dist = _dist()
        if dist is None:
            if not _FLAG.signum:
                return False
            self._stop(step, (RankSignal(dist_init.get_rank(), self.signal or "?", _FLAG.time),))
            return True
        group = self._agreement_group(dist)
        if self._pending is not None:
            # the all-reduce posted at the last agreement step has had a whole step to finish
            (work, buf), self._pending = self._pending, None
            self._wait(dist, step, lambda: work.wait())
            if self._decide(step, buf):
                return True
        buf = self._local_flags(dist)
        if not block:
            work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group, async_op=True)
            self._pending = (work, buf)
            return False
        # the first agreement (a signal during set-up stops at the first step), overlap=False and agree()
        self._posted = True
        self._wait(dist, step, lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group))
        return self._decide(step, buf)

    def _local_flags(self, dist: Any) -> Any:
        """A fresh ``[2, world]`` int64 tensor with this rank's signal number and time in its column."""
        import torch

        buf = torch.zeros(2, dist.get_world_size(), dtype=torch.int64)
        if _FLAG.signum:
            buf[0, dist.get_rank()] = _FLAG.signum
            buf[1, dist.get_rank()] = int(_FLAG.time * 1e6)
        return buf

    def _wait(self, dist: Any, step: int, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PreemptError(
                message(
                    f"Preemption.should_stop: the stop agreement at step {step} failed on rank {dist.get_rank()} "
                    f"of {dist.get_world_size()}: another rank exited, was killed or is stuck",
                    got=f"{type(exc).__name__}: {first}",
                    fix="find the first error in the other ranks' logs; init_distributed(timeout=...) bounds a "
                    "stuck rank",
                )
            ) from exc

    def _decide(self, step: int, buf: Any) -> bool:
        got = self._signals(buf)
        if got:
            self._stop(step, got)
        return bool(got)

    @staticmethod
    def _signals(buf: Any) -> tuple[RankSignal, ...]:
        signums, times = buf[0].tolist(), buf[1].tolist()
        return tuple(RankSignal(r, signal_name(s) or "?", t / 1e6) for r, (s, t) in enumerate(zip(signums, times)) if s)

    def _arm_deadline(self, signum: int) -> None:
        """From the signal handler: unless an agreement takes the stop up within the bound, dump and leave."""
        bound = _stop_bound(self.stop_timeout, signum)
        if bound is None or self._deadline is not None:
            return
        self._deadline = threading.Timer(bound, _not_acted_on, args=(signum, bound))
        self._deadline.name, self._deadline.daemon = "ratlib-preempt-deadline", True
        self._deadline.start()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def _stop(self, step: int, got: tuple[RankSignal, ...]) -> None:
        self._disarm()
        self.stop_step, self.received = step, got
        self.latency = max(0.0, time.time() - min(g.time for g in got))
        log.warning(
            "preemption: stopping at step %d on every rank (%s; %.2f s after the first signal)",
            step,
            _who(got),
            self.latency,
            main_process_only=False,
        )

    def _agreement_group(self, dist: Any) -> Any:
        """The default group under gloo; under nccl a gloo side group, so the flag never syncs the GPU."""
        if "gloo" in str(dist.get_backend()):
            return None
        return self._side_group(dist)

    def _side_group(self, dist: Any) -> Any:
        default = dist.group.WORLD
        if self._group is None or self._group_for is not default:
            kwargs = {"timeout": timedelta(seconds=self.timeout)} if self.timeout else {}
            self._group, self._group_for = dist.new_group(backend="gloo", **kwargs), default
        return self._group

    @property
    def progressed(self) -> bool:
        """Steps were done in this process before the stop: it was asked at more than one step (counted, not
        compared: a resumed run's first step need not be 0)."""
        return self.stop_step is not None and self._steps_seen > 1

    def exit(
        self,
        code: int = PREEMPT_EXIT_CODE,
        *,
        requeue: bool = True,
        requeue_command: Sequence[str] = REQUEUE_COMMAND,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """After the checkpoint: log who got which signal, tear down, requeue (Slurm), exit with ``code``.

        Rank 0 runs ``requeue_command $SLURM_JOB_ID`` when ``requeue`` is true, the job runs under Slurm
        (``SLURM_JOB_ID`` is set) and this process made progress (``progressed``): a job stopped before
        its first step since it started again is not requeued, so nothing loops. Raises ``SystemExit``,
        so ``finally`` blocks and ``atexit`` handlers run.
        """
        env = os.environ if environ is None else environ
        rank = dist_init.get_rank()
        step = self.stop_step
        log.warning(
            "preemption: exiting at step %s with code %d; %s; this rank got %s",
            step,
            code,
            _who(self.received) if self.received else "no signal was agreed on (exit() called directly)",
            self.signal or "no signal",
            main_process_only=False,
        )
        self._disarm()
        self._leave_together()
        dist_init.shutdown()
        if rank == 0 and requeue and self.requeue_allowed:
            _requeue(self, requeue_command, env)
        sys.stdout.flush()
        sys.stderr.flush()
        # From here the stop signals are ignored at the OS level: once the first rank has left, torchrun sends
        # SIGTERM to the others, and Python restores SIGTERM's default action while it finalises, which would
        # turn this rank's 75 into -15. SIG_IGN survives finalisation.
        for signum in self.signums:
            signal.signal(signum, signal.SIG_IGN)
        raise SystemExit(code)

    def _leave_together(self, wait_s: float = 60.0) -> None:
        """Every rank reaches this point (its checkpoint written) before any leaves, so that no launcher sees
        one rank gone while another still writes. Through the store (a rank that called ``exit()`` alone
        meets no collective) and bounded: after ``wait_s`` this rank leaves anyway, with a warning."""
        from ratlib.comm import ChannelError, StoreChannel

        if _dist() is None:
            return
        try:
            StoreChannel("ratlib-preempt", wait_s=wait_s).all_gather(f"exit/{self.stop_step}", 1)
        except ChannelError as exc:
            log.warning("preemption: leaving without the other ranks: %s", exc, main_process_only=False)


def _who(got: Iterable[RankSignal]) -> str:
    return ", ".join(f"rank {g.rank} got {g.signal}" for g in got) or "no rank got a signal"


def _requeue(pre: Preemption, command: Sequence[str], env: Mapping[str, str]) -> bool:
    if pre.progressed:
        return requeue_slurm_job(command=command, environ=env)
    if env.get("SLURM_JOB_ID"):
        log.warning(
            "preemption: no requeue of Slurm job %s: no step done since this start (step %s, restart count %s); "
            "requeueing again would loop",
            env["SLURM_JOB_ID"],
            pre.start_step,
            env.get("SLURM_RESTART_COUNT", "0"),
        )
    return False


def requeue_slurm_job(*, command: Sequence[str] = REQUEUE_COMMAND, environ: Mapping[str, str] | None = None) -> bool:
    """Requeue this Slurm job (``scontrol requeue $SLURM_JOB_ID``); True when Slurm took it.

    Nothing happens outside Slurm, or with ``RATLIB_REQUEUE=0`` in the environment (a driver that owns the job
    sets it for the runs it starts, and requeues once itself). Call it only when the job made progress since it
    started, or a requeued job that stops again at once would loop.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        log.info("preemption: not under Slurm (no SLURM_JOB_ID): no requeue")
        return False
    if env.get(NO_REQUEUE_ENV) == "0":
        log.info(
            "preemption: %s=0: the process that started this run requeues job %s, not this run", NO_REQUEUE_ENV, job
        )
        return False
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    cmd = [*command, job]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("preemption: requeue failed: %s: %s", shlex.join(cmd), exc)
        return False
    if done.returncode != 0:
        log.error(
            "preemption: requeue failed: %s exited %d: %s (submit with sbatch --requeue; interactive srun "
            "jobs cannot be requeued)",
            shlex.join(cmd),
            done.returncode,
            (done.stderr or done.stdout).strip(),
        )
        return False
    log.warning("preemption: requeued Slurm job %s (restart count so far %s): %s", job, restarts, shlex.join(cmd))
    return True


def _dist() -> Any | None:
    dist = sys.modules.get("torch.distributed")  # no group can exist unless torch.distributed is loaded
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist


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


# ----------------------------------------------------------------------------------------------
# Signal lead time


def _parse_signal_spec(spec: str) -> float | None:
    """Seconds from a Slurm ``--signal`` value ``[{R|B}:]<sig>[@sig_time]``; None when it is not one."""
    spec = spec.strip()
    if not spec:
        return None
    spec = spec.split(":", 1)[1] if ":" in spec else spec
    if "@" not in spec:
        return _DEFAULT_SIGNAL_LEAD
    try:
        return float(spec.rsplit("@", 1)[1])
    except ValueError:
        return None


def check_lead_time(
    step_seconds: float,
    save_seconds: float,
    *,
    lead_seconds: float | None = None,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> float | None:
    """Warn when the signal's lead time is shorter than one step plus one checkpoint write (measured by you).

    The lead time is ``lead_seconds`` if given, else ``RATLIB_SIGNAL_LEAD`` (seconds), else Slurm's
    ``SBATCH_SIGNAL``/``SLURM_SIGNAL`` (the input variables that set ``--signal``; an ``#SBATCH --signal``
    line is not visible inside the job, so pass it yourself then). Kubernetes' terminationGracePeriodSeconds
    and torchrun's 30 s are not visible either. Returns the lead time used, or None when unknown.
    """
    env = os.environ if environ is None else environ
    lead = lead_seconds
    source = "lead_seconds"
    if lead is None:
        for name in ("RATLIB_SIGNAL_LEAD", "SBATCH_SIGNAL", "SLURM_SIGNAL"):
            if env.get(name):
                value = env[name]
                lead = _parse_signal_spec(value) if name != "RATLIB_SIGNAL_LEAD" else _float_or_none(value)
                source = f"{name}={value}"
                if lead is not None:
                    break
    if lead is None:
        log.info("preemption: signal lead time unknown (pass lead_seconds=, or set RATLIB_SIGNAL_LEAD)")
        return None
    need = float(step_seconds) + float(save_seconds)
    if lead < need:
        text = (
            f"preemption: the signal comes {lead:g} s before the kill ({source}), but one step ({step_seconds:.1f} s) "
            f"plus a checkpoint write ({save_seconds:.1f} s) take {need:.1f} s: the checkpoint may be cut off; "
            f"ask for more (e.g. #SBATCH --signal=USR1@{int(need * 2) + 30})"
        )
        (warn or log.warning)(text)
    return float(lead)


def _float_or_none(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None

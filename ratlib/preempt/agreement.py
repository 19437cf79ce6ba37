"""The agreement: ``Preemption.should_stop(step)`` turns every rank's flag into one decision at one step, in
one small all-reduce (posted a step ahead with ``overlap``); ``exit()`` leaves together and requeues.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ratlib import dist_init
from ratlib.errors import message
from ratlib.preempt.signals import (
    _FLAG,
    PREEMPT_EXIT_CODE,
    REQUEUE_COMMAND,
    PreemptError,
    PreemptInputError,
    _not_acted_on,
    _stop_bound,
    log,
    signal_name,
)
from ratlib.preempt.slurm import _requeue

__all__ = ["Preemption"]

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
        world, rank = dist.get_world_size(), dist.get_rank()
        rows = [[0] * world for _ in range(2 + len(flags))]
        if _FLAG.signum:
            rows[0][rank], rows[1][rank] = _FLAG.signum, int(_FLAG.time * 1e6)
        for i, f in enumerate(flags):
            rows[2 + i][rank] = f
        buf = torch.tensor(rows, dtype=torch.int64)  # one op in, one copy out: each small op costs under load
        self._posted = True
        self._wait(dist, step, lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group))
        signums, times, *agreed = buf.tolist()
        got = earlier or tuple(
            RankSignal(r, signal_name(s) or "?", t / 1e6) for r, (s, t) in enumerate(zip(signums, times)) if s
        )
        if got or self._carried is None:  # a stop already carried is kept until should_stop takes it
            self._carried = got
        return [list(col) for col in zip(*agreed)] if agreed else [[] for _ in range(world)]

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

    def exit_if_stopping(self, step: int, *, stopped: bool = False, close: Callable[[], Any] | None = None) -> None:
        """A loop's one stop site, after the checkpoint of ``step``: when the stop is agreed already (``stopped``:
        the epoch ended early at an agreed stop) or every rank agrees now (``should_stop``, on every rank),
        ``close()`` (the tracker's: its lines on disk before a requeued job starts) and ``exit()``; else return."""
        if not (stopped or self.should_stop(step)):
            return
        log.warning("stopped at step %d: checkpoint saved", step, main_process_only=False)
        if close is not None:
            close()
        self.exit()

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
        from ratlib.checkpoint.async_save import wait_pending

        wait_pending()  # an asynchronous checkpoint save is committed (or its error raised) before any rank leaves
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


def _dist() -> Any | None:
    dist = sys.modules.get("torch.distributed")  # no group can exist unless torch.distributed is loaded
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist

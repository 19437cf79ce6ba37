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
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from types import FrameType
from typing import Any

from ratlib import comm, dist_init
from ratlib.errors import RatlibError, message
from ratlib.launch import process_group, rank_state
from ratlib.rank_logger import get_logger, log_file_path, rank_tag

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
    "uninstall",
]

HANG_EXIT_CODE = 124  # like coreutils `timeout`: the process ended because it made no progress

_PREFIX = "ratlib/hang/"
_REPORT_WINDOW_CAP = 60.0  # the longest a stalled rank waits for the others' reports
_EXIT_WAIT = 5.0  # rank 0 (usually the store's host) waits this long for the others to finish with it

log = get_logger("ratlib.hang")


class HangError(RatlibError, RuntimeError):
    """A rank made no progress (no ``heartbeat``) for ``stall_timeout`` seconds."""

    exit_code = HANG_EXIT_CODE


class CollectiveMismatchError(RatlibError, RuntimeError):
    """Ranks reached different ratlib collectives (operation, call site or step) at the same point."""


class HangInstallError(RatlibError, ValueError):
    """``hang.install`` was given a ``stall_timeout`` or ``dump_signal`` it cannot use."""


# ----------------------------------------------------------------------------------------------
# The hot path: one call per training step

_step: Any = None  # the last heartbeat's step
_beats = 0  # heartbeats so far; the watchdog thread notes when this changes
_monotonic = time.monotonic


def heartbeat(step: int) -> None:
    """Record progress: call once per training step. Two stores: no clock, lock, syscall or collective.

    The stall watchdog (``install(stall_timeout=...)``) is armed by the first call after ``install``;
    the call is harmless and nearly free when nothing is installed.
    """
    global _step, _beats
    _step = step
    _beats += 1


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


def _check_preempt_conflict(signum: int | None) -> None:
    # ratlib.preempt is a peer: look it up, never import it (it is loaded if it handles any signal)
    preempt = sys.modules.get("ratlib.preempt")
    if signum is None or preempt is None or signum not in preempt.installed_signals():
        return
    name = _signame(signum)
    taken = sorted(_signame(s) for s in preempt.installed_signals())
    raise preempt.SignalConflictError(
        message(
            f"hang.install: dump_signal={name} is already a ratlib.preempt stop signal",
            got=f"hang dump_signal={name}, preempt signals {taken}",
            fix="give each its own signal: hang.install(dump_signal='SIGUSR2') (the default), preempt SIGTERM/SIGUSR1",
        )
    )


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
    _check_preempt_conflict(signum)
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
    roots.add(os.path.dirname(os.path.abspath(__file__)))
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


# ----------------------------------------------------------------------------------------------
# Collective check


def _call_site() -> tuple[str, str]:
    """(display, id) of the first frame outside ratlib.comm / ratlib.hang: the user's call."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__") in ("ratlib.comm", "ratlib.hang"):
        frame = frame.f_back
    code = frame.f_code
    func = getattr(code, "co_qualname", code.co_name)
    return _describe(frame), f"{os.path.basename(code.co_filename)}:{frame.f_lineno}:{func}"


def before_collective(op: str) -> None:
    """Called by every ``ratlib.comm`` collective; with ``check_collectives`` the ranks must agree."""
    if not _S.check:
        return
    store = _S.check_store
    if store is None:
        if _group() is None or _world() == 1:
            return
        store = _S.check_store = _require_store("check_collectives=True")
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return
    site, site_id = _call_site()
    seq = _S.seq
    _S.seq += 1
    _agree(
        store,
        int(dist.get_rank()),
        int(dist.get_world_size()),
        seq,
        {
            "op": op,
            "site": site,
            "id": site_id,
            "step": _step if isinstance(_step, (int, float)) else (None if _step is None else str(_step)),
        },
    )


def _agree(store: Any, rank: int, world: int, seq: int, record: dict[str, Any]) -> None:
    """Publish this rank's record for collective ``seq``, read every rank's, raise where they differ."""
    key = f"{_PREFIX}coll/{seq}/"
    store.set(key + str(rank), json.dumps(record))
    keys = [key + str(r) for r in range(world)]
    try:
        values = store.multi_get(keys)  # waits (server side) for every rank, up to the store's timeout
    except Exception as exc:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        if not missing:
            raise  # the store itself failed, not a rank
        raise CollectiveMismatchError(
            message(
                f"ratlib collective #{seq} ({record['op']} at {record['site']}, step {record['step']}): "
                f"{_ranks(missing)} never reached it within the store timeout ({exc.__class__.__name__}). "
                "They are in a collective that is not from ratlib.comm, stuck, or dead",
                fix="see their logs (install(stall_timeout=...) dumps their stacks)",
            )
        ) from None
    if seq >= 2:
        with contextlib.suppress(Exception):  # every rank has read collective seq-2's records by now
            store.delete_key(f"{_PREFIX}coll/{seq - 2}/{rank}")
    records = [json.loads(v) for v in values]
    if any((r["op"], r["id"], r["step"]) != (record["op"], record["id"], record["step"]) for r in records):
        raise CollectiveMismatchError(_mismatch_message(seq, records))


def _mismatch_message(seq: int, records: list[dict[str, Any]]) -> str:
    groups: dict[tuple[Any, ...], list[int]] = {}
    for rank, r in enumerate(records):
        groups.setdefault((r["op"], r["site"], r["step"]), []).append(rank)
    lines = [f"ratlib collective #{seq} differs across ranks (check_collectives=True):"]
    for (op, site, step), ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
        lines.append(f"  {_ranks(ranks)}: {op} at {site} (step {step})")
    return message(
        "\n".join(lines) + "\nEvery rank must call the same collectives in the same order and step",
        fix="look for a branch that differs by rank before these call sites (a data-dependent if, an uneven "
        "last batch, an exception caught on one rank)",
    )


def _ranks_text(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out) or "none"


def _ranks(ranks: Iterable[int]) -> str:
    """'rank 2' or 'ranks 0-2, 5'."""
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranks_text(ranks)}" if ranks else "no rank"


# ----------------------------------------------------------------------------------------------
# Stall reports and the summary


@dataclass(frozen=True)
class StallReport:
    """What a stalled rank publishes: its last step, when it beat last, where its main thread is."""

    rank: int
    step: Any
    beat_time: float  # wall-clock time of the last heartbeat
    frame: str  # innermost frame of the main thread
    site: str  # innermost frame in the user's code
    host: str
    pid: int

    def to_json(self) -> str:
        """The report as the JSON a rank publishes to the store."""
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> StallReport:
        """A report read back from the store (``to_json``'s output)."""
        return cls(**json.loads(text))


def _odd_ranks(reports: dict[int, StallReport], world_size: int) -> tuple[dict[int, str], str]:
    """{rank: why it is odd}, and a one-line verdict. Odd: not in the majority's (step, place), or silent."""
    odd = {r: "no report" for r in range(world_size) if r not in reports}
    if not reports:
        return odd, "no rank reported"
    places = {r: (rep.step, rep.frame, rep.site) for r, rep in reports.items()}
    counts = Counter(places.values()).most_common()
    if len(counts) == 1:
        verdict = "every reporting rank is at the same step and place"
        return odd, verdict + (f"; silent: {_ranks(odd)}" if odd else "")
    if counts[0][1] == counts[1][1]:
        return odd, "no majority: the ranks are at different steps or places, see the table"
    step, frame, site = counts[0][0]
    for r, (s, f, w) in places.items():
        if (s, f, w) != (step, frame, site):
            why = [f"step {s} (others {step})"] if s != step else []
            odd[r] = ", ".join(why + (["elsewhere"] if (f, w) != (frame, site) else []))
    return odd, f"odd one out: {_ranks(odd)}"


def format_summary(
    reports: Iterable[StallReport], world_size: int, stall_timeout: float, now: float | None = None
) -> tuple[str, list[int]]:
    """The hang summary table, and the odd ranks (those not at the majority's step and place)."""
    by_rank = {r.rank: r for r in reports}
    now = time.time() if now is None else now
    odd, verdict = _odd_ranks(by_rank, world_size)
    head = ["", "rank", "last step", "age", "innermost frame", "in user code", "host:pid", ""]
    rows = []
    for rank in range(world_size):
        rep = by_rank.get(rank)
        mark = ">>" if rank in odd else ""
        note = f"<- {odd[rank]}" if rank in odd else ""
        if rep is None:
            rows.append(
                [
                    mark,
                    str(rank),
                    "?",
                    "?",
                    "(no report: still running, dead, or blocked holding the GIL)",
                    "",
                    "",
                    note,
                ]
            )
            continue
        site = "same" if rep.site == rep.frame else rep.site
        rows.append(
            [
                mark,
                str(rank),
                str(rep.step),
                f"{max(now - rep.beat_time, 0):.1f}s",
                rep.frame,
                site,
                f"{rep.host}:{rep.pid}",
                note,
            ]
        )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    text = (
        f"hang summary: {len(by_rank)} of {world_size} rank(s) stalled (no heartbeat for {stall_timeout:g} s); "
        f"{verdict}.\n" + "\n".join(table) + "\nEvery stalled rank's log has the stacks of all its threads. "
        "Ranks blocked in a collective are usually waiting for the odd one: look at its innermost frame."
    )
    return text, sorted(odd)


# ----------------------------------------------------------------------------------------------
# The watchdog


def _watch(stop: threading.Event, stall_timeout: float) -> None:
    """Every tick, note whether ``_beats`` moved; a stall is ``stall_timeout`` without a move (+- a tick)."""
    tick = min(max(stall_timeout / 10, 0.05), 1.0)
    armed_after = seen = fired = _beats  # armed by the first heartbeat after install
    seen_at = _monotonic()
    while not stop.wait(tick):
        if _group() is not None:
            _S.had_group = True
        elif _S.had_group:
            continue  # the process group is gone: training is over, a quiet phase is not a hang
        beats, now = _beats, _monotonic()
        if beats != seen:
            seen, seen_at = beats, now
            continue
        if beats == armed_after or beats == fired or now - seen_at < stall_timeout:
            continue
        fired = beats
        try:
            _on_stall(now - seen_at, stall_timeout)
        except Exception:  # the watchdog must never die of its own bug
            log.exception("ratlib.hang: the stall report failed")
            if _S.abort:
                _exit()


def _on_stall(age: float, stall_timeout: float) -> None:
    step = _step
    frame, site = _locate(_main_frame())
    rank = rank_state().rank
    world = _world()
    me = StallReport(rank, step, time.time() - age, frame, site, socket.gethostname(), os.getpid())
    log.error(
        "%s no heartbeat for %.1f s (stall_timeout=%g s): last step %s; main thread at %s%s. "
        "Stacks of all threads, most recent call first:\n%s",
        rank_tag(),
        age,
        stall_timeout,
        step,
        frame,
        "" if site == frame else f", called from {site}",
        _stack_text(),
    )
    if _S.abort:
        _take_excepthook()
    summary = _share(me, world, stall_timeout)
    odd = summary.get("odd", [])
    odd_text = f"Odd one out: {_ranks(odd)}{' (this rank)' if rank in odd else ''}" if odd else "No single odd rank"
    printer = summary.get("printer")
    table_at = (
        "this log"
        if printer == rank
        else f"rank {printer}'s log"
        if printer is not None
        else "not printed (no rank could)"
    )
    text = (
        f"{rank_tag()} no heartbeat for {age:.1f} s (stall_timeout={stall_timeout:g} s): last step {step}, "
        f"main thread at {site}. {odd_text}. Summary table: {table_at}; stacks: {log_file_path() or 'stderr'}."
    )
    if not _S.abort:
        log.error("%s Going on (abort_after_dump=False).", text)
        _S.finished.set()
        return
    log.critical(
        "%s ending this process with exit code %d, so that the job fails now instead of waiting for the "
        "collective timeout (install(abort_after_dump=False) only reports)",
        rank_tag(),
        HANG_EXIT_CODE,
        exc_info=(HangError, HangError(text), None),
    )
    _leave(summary, rank)


def _share(me: StallReport, world: int, stall_timeout: float) -> dict[str, Any]:
    """Publish this rank's report; the lowest reporting rank logs the summary. Returns its record."""
    store = _S.watch_store = _S.watch_store or _clone_store()  # installed before the group: look again
    if store is None or world == 1:
        text, odd = format_summary([me], world, stall_timeout)
        log.error("%s%s", text, "" if world == 1 else "\n(no store: the other ranks' reports are in their own logs)")
        return {"printer": me.rank, "odd": odd}
    try:
        return _share_through(store, me, world, stall_timeout)
    except Exception as exc:  # the store's host died: report alone
        text, odd = format_summary([me], world, stall_timeout)
        log.error(
            "%s\n(the store is unreachable: %s; the other ranks' reports are in their own logs)",
            text,
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
        )
        return {"printer": me.rank, "odd": odd}


def _share_through(store: Any, me: StallReport, world: int, stall_timeout: float) -> dict[str, Any]:
    base = f"{_PREFIX}incident{int(store.add(_PREFIX + 'incidents', 0))}/"
    store.append(base + "reports", me.to_json() + "\n")
    store.add(base + "count", 1)
    window = min(stall_timeout, _REPORT_WINDOW_CAP)
    _poll(lambda: store.add(base + "count", 0) >= world or store.check([base + "summary"]), window)
    if not store.check([base + "summary"]):
        reports = [StallReport.from_json(line) for line in store.get(base + "reports").decode().splitlines() if line]
        if me.rank == min(r.rank for r in reports) or not _poll(lambda: store.check([base + "summary"]), window + 5):
            if store.add(base + "claim", 1) == 1:  # exactly one rank prints, the lowest reporter if it can
                text, odd = format_summary(reports, world, stall_timeout)
                log.error("%s", text)
                store.set(base + "summary", json.dumps({"printer": me.rank, "odd": odd}))
                store.add(_PREFIX + "incidents", 1)  # a later stall (abort_after_dump=False) is a new incident
    _poll(lambda: store.check([base + "summary"]), 5)
    summary: dict[str, Any] = json.loads(store.get(base + "summary")) if store.check([base + "summary"]) else {}
    summary["base"] = base
    return summary


def _poll(done: Any, seconds: float, interval: float = 0.1) -> bool:
    deadline = _monotonic() + seconds
    while not done():
        if _monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _leave(summary: dict[str, Any], rank: int) -> None:
    """End the process; rank 0 (which usually hosts the store) last, once the others are done with it."""
    store, base = _S.watch_store, summary.get("base")
    if store is not None and base is not None:
        with contextlib.suppress(Exception):
            store.add(base + "exited", 1)
            if rank == 0:
                _poll(lambda: store.add(base + "exited", 0) >= store.add(base + "count", 0), _EXIT_WAIT, 0.02)
    _S.finished.set()
    _exit()


def _take_excepthook() -> None:
    """Once a hang is declared, a peer's exit breaks this rank's collective: end with the hang's exit code."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        log.warning(
            "%s main thread raised %s after the hang was declared (a peer rank ended): %s",
            rank_tag(),
            exc_type.__name__,
            str(exc).splitlines()[0][:300] if str(exc) else "",
        )
        _S.finished.wait(_REPORT_WINDOW_CAP + 15)
        _exit()

    sys.excepthook = hook


def _exit() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(HANG_EXIT_CODE)


dist_init.set_hang_install(install)  # init_distributed(stall_timeout=..., check_collectives=...) calls it

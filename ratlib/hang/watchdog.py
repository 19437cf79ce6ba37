"""The hot path (``heartbeat``: two stores per step) and the watchdog thread that notices when it stops: dump,
share the report through the store, one summary, then the end of the process with ``HANG_EXIT_CODE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from ratlib.hang.dumps import _locate, _main_frame, _stack_text
from ratlib.hang.state import (
    _EXIT_WAIT,
    _PREFIX,
    _REPORT_WINDOW_CAP,
    _S,
    HANG_EXIT_CODE,
    HangError,
    _clone_store,
    _group,
    _world,
    log,
)
from ratlib.hang.summary import StallReport, _ranks, format_summary
from ratlib.launch import rank_state
from ratlib.rank_logger import log_file_path, rank_tag

__all__ = ["heartbeat"]

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

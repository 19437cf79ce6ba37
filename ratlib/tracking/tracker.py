"""The ``Tracker``: one worker thread per backend with a bounded queue, so the training thread only enqueues; a
backend that fails, stalls or falls behind is dropped with one warning. The package's docstring has the pattern.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import numbers
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ratlib.errors import message
from ratlib.tracking import backends as _backends
from ratlib.tracking.backends import _BUILTIN, _HINTS, BACKENDS, Backend, BackendStart
from ratlib.tracking.values import TrackingError, _is_main, _log, _value, flatten_config

STATE_FILE = "tracking.json"  # the run ids (and, after a clean close, the last step), for resume=True


# ----------------------------------------------------------------------------------------------
# One worker thread per backend


_STOP = object()


class _Worker:
    """Runs one backend's calls in order on its own thread; the training thread only enqueues."""

    def __init__(
        self,
        backend: Backend,
        run: BackendStart,
        *,
        start_timeout: float,
        write_timeout: float,
        queue_size: int,
        on_state: Any,
    ) -> None:
        self.backend, self.name = backend, backend.name
        self.start_timeout, self.write_timeout = start_timeout, write_timeout
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.state: dict[str, Any] = dict(run.state)
        self.dropped = False  # set once, with the one warning
        self.busy: tuple[str, float] | None = ("start", time.monotonic())  # the call running now, since when
        self._lock = threading.Lock()
        self._on_state = on_state
        self._run = run
        self.thread = threading.Thread(target=self._main, name=f"ratlib-tracking-{self.name}", daemon=True)
        self.thread.start()

    def drop(self, cause: str) -> None:
        """Give up on this backend: one warning with the cause; the others go on."""
        with self._lock:
            if self.dropped:
                return
            self.dropped = True
        _log().warning("tracking backend %r is dropped: %s. Training and the other backends go on.", self.name, cause)

    def _main(self) -> None:
        try:
            self.state.update(self.backend.start(self._run) or {})
        except Exception as exc:
            self.busy = None
            return self.drop(f"its start raised {type(exc).__name__}: {exc}")
        if self.dropped:  # the start came back after its timeout: leave quietly
            with contextlib.suppress(Exception):
                self.backend.close()
            return
        self.busy = None
        self._on_state()
        while True:
            item = self.queue.get()
            if self.dropped:
                return
            if item is _STOP:
                what, call = "close", self.backend.close
            elif isinstance(item, threading.Event):
                what, call = "flush", self.backend.flush
            else:
                what, call = f"log (step {item[1]})", functools.partial(self.backend.log, *item)
            self.busy = (what, time.monotonic())
            try:
                call()
            except Exception as exc:
                self.busy = None
                if item is not _STOP:
                    with contextlib.suppress(Exception):
                        self.backend.close()
                return self.drop(f"its {what} raised {type(exc).__name__}: {exc}")
            self.busy = None
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()

    def check(self, now: float) -> bool:
        """False once dropped; drops a backend whose current call has run past its timeout."""
        if self.dropped:
            return False
        busy = self.busy
        if busy is not None:
            what, since = busy
            limit = self.start_timeout if what == "start" else self.write_timeout
            if now - since > limit:
                arg = "start_timeout" if what == "start" else "write_timeout"
                self.drop(f"its {what} has not returned after {now - since:.1f}s ({arg}={limit:g}s)")
                return False
        return True

    def put(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            what = self.busy[0] if self.busy else "writes"
            self.drop(f"it has fallen {self.queue.maxsize} records behind (still in its {what})")


# ----------------------------------------------------------------------------------------------
# Tracker


class Tracker:
    """Metrics to metrics.jsonl, TensorBoard, W&B and MLflow from the main rank; inert on the others.

    ``backends``: names from ``BACKENDS`` or ``Backend`` instances. A named backend whose package is not
    installed is left out with one line that gives the install hint (INFO for tensorboard, WARNING for
    wandb and mlflow). ``config`` is logged once, at the first start (TensorBoard text, W&B config, MLflow
    params). ``resume``: False for a new run; the ``state_dict()`` kept in the checkpoint to continue that
    run from the checkpoint's step; True to continue the run recorded in ``run_dir/tracking.json`` (its
    run ids, and its last step after a clean close; after a crash nothing is purged, so prefer the state).
    ``start_timeout``, ``write_timeout``: how long a backend's start or one write may take before it is
    dropped; ``close_timeout``: ``close()`` returns within it. ``tensorboard``, ``wandb``, ``mlflow``,
    ``jsonl``: options for that backend (``wandb={"project": "seg"}``, ``mlflow={"tracking_uri": ...}``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        backends: Iterable[str | Backend] = ("jsonl", "tensorboard"),
        config: Any = None,
        resume: bool | Mapping[str, Any] = False,
        name: str | None = None,
        start_timeout: float = 120.0,
        write_timeout: float = 60.0,
        close_timeout: float = 30.0,
        queue_size: int = 10_000,
        jsonl: Mapping[str, Any] | None = None,
        tensorboard: Mapping[str, Any] | None = None,
        wandb: Mapping[str, Any] | None = None,
        mlflow: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.close_timeout = close_timeout
        self.enabled = _is_main()
        self._workers: list[_Worker] = []
        self._closed = False
        self._state_lock = threading.Lock()
        self._file_lock = threading.Lock()
        state = self._resume_state(resume)
        self.last_step: int | None = state.get("step")
        self.run_id: str = state.get("run_id") or uuid.uuid4().hex
        chosen = self._choose(backends)  # unknown names are an error on every rank
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)  # a script that forgets close() still flushes, within the deadline
        options = {"jsonl": jsonl, "tensorboard": tensorboard, "wandb": wandb, "mlflow": mlflow}
        resuming = bool(state)
        earlier = self.run_dir / ((jsonl or {}).get("filename") or "metrics.jsonl")
        if not resuming and earlier.is_file() and earlier.stat().st_size > 0:
            _log().warning(
                "%s already holds metrics from an earlier run; this new run adds to it. To continue that run "
                "pass resume=<the tracker state kept in its checkpoint>; for a separate run use a new run_dir",
                earlier,
            )
        flat = flatten_config(config) if config is not None and not resuming else None
        saved = state.get("backends", {})
        for backend in chosen:
            run = BackendStart(
                run_dir=self.run_dir,
                name=name or self.run_dir.resolve().name,
                config=flat,
                raw_config=config,
                resume_step=self.last_step if resuming else None,
                state=dict(saved.get(backend.name, {})),
                options=dict(options.get(backend.name) or {}),
            )
            self._workers.append(
                _Worker(
                    backend,
                    run,
                    start_timeout=start_timeout,
                    write_timeout=write_timeout,
                    queue_size=queue_size,
                    on_state=self._write_state,
                )
            )

    def _resume_state(self, resume: bool | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(resume, Mapping):
            return dict(resume)
        if resume is True:
            path = self.run_dir / STATE_FILE
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
        if resume is not False and resume is not None:
            raise TrackingError(
                message(
                    "Tracker: resume is not a state",
                    got=repr(resume),
                    expected="False, True, or the dict from Tracker.state_dict()",
                )
            )
        return {}

    def _choose(self, backends: Iterable[str | Backend]) -> list[Backend]:
        if isinstance(backends, str):
            backends = [backends]
        chosen: list[Backend] = []
        for item in backends:
            if isinstance(item, Backend):
                chosen.append(item)
                continue
            key = str(item).strip().lower()
            if key not in _BUILTIN:
                import difflib

                close = difflib.get_close_matches(key, BACKENDS, n=1)
                raise TrackingError(
                    message(
                        f"Tracker: unknown backend {item!r}",
                        expected=", ".join(BACKENDS),
                        fix=f"did you mean {close[0]!r}?" if close else None,
                    )
                )
            if not _backends._installed(key):  # looked up here, so a test can replace it
                if _is_main():
                    level = "info" if key == "tensorboard" else "warning"
                    getattr(_log(), level)(
                        "%s logging is off: %s is not installed (%s); the other backends go on", key, key, _HINTS[key]
                    )
                continue
            chosen.append(_BUILTIN[key]())
        return chosen

    # -- the training thread's calls -----------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``metrics`` at ``step`` (every rank may call it; only the main rank logs).

        A step may repeat (training and evaluation values at one step) but never go back. Tensors are
        read here (``.item()``), since they may change in place later.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise TrackingError(message("Tracker.log: step must be a non-negative int", got=repr(step)))
        step = int(step)
        if self.last_step is not None and step < self.last_step:
            raise TrackingError(
                message(
                    f"Tracker.log: step {step} goes backwards: the last step logged (or resumed from) is "
                    f"{self.last_step}, and trackers drop or overwrite passed steps",
                    fix="pass a global step that only increases (optimizer steps across epochs and resumes), "
                    "not a per-epoch batch index",
                )
            )
        self.last_step = step
        if not self.enabled or self._closed:
            return
        record = {str(k): _value(v) for k, v in metrics.items()}
        if "step" in record:
            given = record.pop("step")
            if given != step:
                raise TrackingError(
                    message(
                        "Tracker.log: metrics['step'] differs from step",
                        got=f"metrics['step']={given!r}, step={step}",
                        fix="drop the key",
                    )
                )
        now = time.monotonic()
        for worker in self._workers:
            if worker.check(now):
                worker.put((record, step))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every backend has written what was logged so far, at most ``timeout`` seconds
        (default ``close_timeout``). False when one still logging had not finished by then; a backend
        dropped meanwhile has had its warning and does not count."""
        if not self.enabled or self._closed:
            return True
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        events = []
        for worker in self._workers:
            if worker.check(time.monotonic()):
                event = threading.Event()
                worker.put(event)
                events.append((worker, event))
        for worker, event in events:
            while not event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if not worker.check(time.monotonic()):
                    break
                if time.monotonic() >= deadline:
                    return False
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint: the run ids of each backend and the last step logged."""
        with self._state_lock:
            return {
                "version": 1,
                "run_id": self.run_id,
                "step": self.last_step,
                "backends": {w.name: dict(w.state) for w in self._workers if w.state},
            }

    @property
    def backends(self) -> list[str]:
        """The backends still logging (on the main rank)."""
        now = time.monotonic()
        return [w.name for w in self._workers if w.check(now)]

    def _write_state(self) -> None:
        from ratlib.io import write_atomic

        with self._file_lock, contextlib.suppress(OSError):  # workers call it from their threads
            write_atomic(self.run_dir / STATE_FILE, json.dumps(self.state_dict(), indent=2, default=str) + "\n")

    def close(self, timeout: float | None = None) -> None:
        """Flush and close every backend, returning within ``timeout`` (default ``close_timeout``) seconds.

        A backend that has not finished by then gives one warning and is left behind (its thread is a daemon).
        """
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        atexit.unregister(self.close)
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        live = [w for w in self._workers if w.check(time.monotonic())]
        for worker in live:
            worker.put(_STOP)
        for worker in live:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                what = worker.busy[0] if worker.busy else "its queue"
                worker.drop(f"it did not finish within the close deadline ({what} still running)")
        self._write_state()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "main rank" if self.enabled else "inert (not the main rank)"
        return f"Tracker({str(self.run_dir)!r}, backends={self.backends}, {where}, last_step={self.last_step})"

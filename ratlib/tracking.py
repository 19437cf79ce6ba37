"""Experiment tracking from the main rank: metrics.jsonl, TensorBoard, W&B, MLflow; never a hung job.

Five lines in a training loop::

    tracker = Tracker(run_dir, config=cfg, resume=ckpt.get("tracker", False) if ckpt else False)
    ...
    tracker.log({"loss": loss.item(), **lr_metrics(optimizer)}, step)   # every rank may call; rank 0 logs
    ...
    save({"model": ..., "tracker": tracker.state_dict()}, path)          # the run ids and the last step
    tracker.close()

- Main rank only: on other ranks a ``Tracker`` is inert (no folder, no file, no thread, no collective).
- Each backend runs on its own worker thread with a bounded queue: ``log`` only puts a record on the
  queues. A backend whose start, write or close fails, stalls past its timeout or falls behind gives one
  warning with the cause and is dropped; training and the other backends go on.
- A resume continues the same run: TensorBoard purges the steps after the checkpoint's step, metrics.jsonl
  drops its rows after it (rewritten atomically), W&B and MLflow reuse the run ids kept in the state.
- Steps never go backwards: a smaller step than the last one is a ``TrackingError`` in the caller's code.

Backend packages (tensorboard, wandb, mlflow) are imported on the worker threads, never at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import math
import numbers
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from ratlib.errors import RatlibError, message

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendStart",
    "Tracker",
    "TrackingError",
    "flatten_config",
    "log_step",
    "lr_metrics",
    "memory_metrics",
    "read_outcome",
    "run_outcome",
    "write_outcome",
]

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
OUTCOME_FILE = "outcome.json"  # how the run ended, for whoever launched it (the ablation driver)
STATE_FILE = "tracking.json"  # the run ids (and, after a clean close, the last step), for resume=True
_HINTS = {
    "tensorboard": "pip install 'ratlib[tensorboard]'",
    "wandb": "pip install 'ratlib[wandb]'",
    "mlflow": "pip install 'ratlib[mlflow]'",
}


class TrackingError(RatlibError, ValueError):
    """A tracking call that is wrong in the caller's code (a step that goes back, an unknown backend)."""


def _log() -> Any:
    from ratlib.rank_logger import get_logger

    return get_logger("ratlib.tracking")


# ----------------------------------------------------------------------------------------------
# Helpers that build what to log


def lr_metrics(optimizer: Any, prefix: str = "lr") -> dict[str, float]:
    """The learning rate of each parameter group: ``{"lr": ...}``, or ``lr/group0``, ``lr/group1``, ..."""
    groups = optimizer.param_groups
    if len(groups) == 1:
        return {prefix: float(groups[0]["lr"])}
    return {f"{prefix}/group{i}": float(g["lr"]) for i, g in enumerate(groups)}


def log_step(
    tracker: Tracker,
    step: int,
    loss: Any,
    optimizer: Any,
    *,
    every: int,
    last: int | None = None,
    epoch: int | None = None,
    seconds_per_step: float | None = None,
    **terms: Any,
) -> bool:
    """The training loop's step line, every ``every`` optimiser steps and at ``last``: ``train/loss`` (one
    ``.item()``, the only host sync), the learning rate (``lr_metrics``) and ``train/<term>`` for each of
    ``terms``, to the tracker and the log. Returns whether it logged. A non-finite loss is only reported here;
    stopping at it is ``ratlib.numerics``'s."""
    if step % every and step != last:
        return False
    value = float(loss.item() if hasattr(loss, "item") else loss)
    if not math.isfinite(value):
        _log().warning("step %d: the loss is %s", step, value)
    lrs = lr_metrics(optimizer)
    tracker.log({"train/loss": value, **{f"train/{k}": v for k, v in terms.items()}, **lrs}, step)
    where = f"epoch {epoch} step {step}" if epoch is not None else f"step {step}"
    pace = f" ({seconds_per_step:.3f} s/step)" if seconds_per_step is not None else ""
    _log().info("%s: loss %.4f lr %.3g%s", where, value, next(iter(lrs.values())), pace)
    return True


def memory_metrics(report: Any, prefix: str = "memory") -> dict[str, float]:
    """Per-rank peak memory scalars (GiB) from a ``ratlib.memory.MemoryReport``.

    ``memory_report`` is a collective: call it on every rank and pass its result here (the tracker
    runs no collectives, so it cannot gather the figures itself).
    """
    gib = 1024**3
    out: dict[str, float] = {}
    for r in report.ranks:
        out[f"{prefix}/rank{r.rank}_peak_gib"] = round(r.peak / gib, 4)
        out[f"{prefix}/rank{r.rank}_allocated_gib"] = round(r.peak_allocated / gib, 4)
    top = report.max
    out[f"{prefix}/max_peak_gib"] = round(top.peak / gib, 4)
    out[f"{prefix}/max_rank"] = top.rank
    return out


def write_outcome(run_dir: str | os.PathLike[str], status: str, **fields: Any) -> Path | None:
    """Write ``run_dir/outcome.json`` (main rank only, atomically): ``{"status": status, **fields}``.

    The run's last word to whoever launched it: ``"finished"`` with the final ``metrics``, or ``"stopped"``
    (preempted, its checkpoint written) with the ``step``. A launcher reads it with :func:`read_outcome` next to
    the exit code; a crash leaves no outcome (or an older one: delete it before each launch).
    """
    if status not in ("finished", "stopped"):
        raise TrackingError(message("write_outcome: unknown status", got=repr(status), expected="finished or stopped"))
    if not _is_main():
        return None
    from ratlib.io import write_atomic

    path = Path(run_dir) / OUTCOME_FILE
    plain = {
        k: {m: _value(x) for m, x in v.items()} if isinstance(v, Mapping) else _value(v) for k, v in fields.items()
    }
    record = {"status": status, **plain, "written_at": time.time()}
    write_atomic(path, (json.dumps(record, default=str) + "\n").encode())
    return path


@contextlib.contextmanager
def run_outcome(run_dir: str | os.PathLike[str]) -> Iterator[Callable[..., Path | None]]:
    """Around a run's training call: yields ``finished(**fields)``, to call with the final metrics (it writes
    ``outcome.json`` "finished"); a preemption stop inside (``SystemExit`` with ``ratlib.preempt``'s exit code)
    writes "stopped" with the stop step, and the exit goes on. Anything else writes nothing."""
    try:
        yield functools.partial(write_outcome, run_dir, "finished")
    except SystemExit as stop:
        from ratlib import preempt

        pre = preempt.current()
        if stop.code == preempt.PREEMPT_EXIT_CODE:
            fields = {"step": pre.stop_step, "progressed": pre.progressed} if pre is not None else {}
            write_outcome(run_dir, "stopped", **fields)
        raise


def read_outcome(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run_dir/outcome.json`` as a dict, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _plain(config: Any) -> Any:
    if hasattr(config, "model_dump"):  # pydantic models (ratlib.config_defaults)
        return config.model_dump(mode="json")
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    return config


def flatten_config(config: Any, sep: str = ".") -> dict[str, Any]:
    """A config (mapping, pydantic model or dataclass) as flat ``{"training.lr": 1e-4, ...}``."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        value = _plain(value)
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{prefix}{sep}{key}" if prefix else str(key))
        else:
            out[prefix or "config"] = value

    walk(config, "")
    return out


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a record (what TensorBoard, W&B and MLflow take); others stay in jsonl."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


def _value(value: Any) -> Any:
    """A metric as plain data, read now on the caller's thread (a tensor may change in place later)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    numel = getattr(value, "numel", None)  # torch tensors; numpy has .size
    size = numel() if callable(numel) else getattr(value, "size", None)
    if hasattr(value, "item") and size == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


# ----------------------------------------------------------------------------------------------
# Backends


@dataclass
class BackendStart:
    """What a backend's ``start`` gets: the run folder, the config, and what a resume continues from."""

    run_dir: Path
    name: str  # the run's display name (default: the run folder's name)
    config: dict[str, Any] | None  # flattened; None on a resume (it was logged at the first start)
    raw_config: Any
    resume_step: int | None  # a resume: drop what was logged after this step; None: a new run
    state: dict[str, Any] = field(default_factory=dict)  # this backend's part of the resumed state
    options: dict[str, Any] = field(default_factory=dict)  # Tracker(..., <backend>={...})


class Backend:
    """One tracking destination. Subclass it to add your own; every method runs on the backend's thread.

    ``start`` returns the plain data a resume needs (a run id), kept in ``Tracker.state_dict()``.
    """

    name = "backend"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        """Open the destination for ``run``; return the plain data a resume needs (kept in the checkpoint)."""
        return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record ``metrics`` (names to numbers) at ``step``; steps only increase."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged so far durable or visible (``Tracker.flush``)."""

    def close(self) -> None:
        """Flush and release the destination; called once, at ``Tracker.close``."""


class JsonlBackend(Backend):
    """``run_dir/metrics.jsonl``: one ``{"step": ..., **metrics}`` line per ``log`` (``ratlib.io``)."""

    name = "jsonl"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        from ratlib.io import read_jsonl, write_atomic

        self.path = run.run_dir / run.options.get("filename", "metrics.jsonl")
        if run.resume_step is not None and self.path.exists():
            rows = read_jsonl(self.path)
            kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= run.resume_step]
            if len(kept) != len(rows):
                write_atomic(self.path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from ratlib.io import append_jsonl

        append_jsonl(self.path, {"step": step, **metrics})


class TensorBoardBackend(Backend):
    """Event files in ``run_dir`` (torch's ``SummaryWriter``, or tensorboardX); ``purge_step`` on a resume."""

    name = "tensorboard"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from tensorboardX import SummaryWriter  # type: ignore[no-redef]  # the fallback: the same writer API
        log_dir = Path(run.options.get("log_dir", run.run_dir))
        purge = None if run.resume_step is None else run.resume_step + 1
        self.writer = SummaryWriter(
            log_dir=str(log_dir), purge_step=purge, flush_secs=run.options.get("flush_secs", 30)
        )
        if run.config:
            lines = [f"    {k}: {json.dumps(v, default=str)}" for k, v in sorted(run.config.items())]
            self.writer.add_text("config", "\n".join(lines), 0)  # a code block in TensorBoard's text tab
        return {"log_dir": str(log_dir)}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend(Backend):
    """A W&B run; its id is kept in the state, so a resume continues it (``resume="allow"``).

    W&B drops a value whose ``step=`` is below the run's current step, so the training step is logged as
    the metric ``step`` (``define_metric(step_metric=...)``) and W&B's own counter only increases.
    """

    name = "wandb"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        import wandb

        run_id = run.state.get("run_id") or run.options.get("id") or uuid.uuid4().hex[:12]
        kwargs: dict[str, Any] = {
            "project": run.options.get("project", "ratlib"),
            "name": run.name,
            "id": run_id,
            "dir": str(run.run_dir),
            "resume": "allow",
            "config": _plain(run.raw_config) if run.config is not None else None,
        }
        kwargs.update({k: v for k, v in run.options.items() if k not in ("project", "id")})
        try:
            self.run = wandb.init(reinit="create_new", **kwargs)  # several runs in a process (wandb >= 0.19.10)
        except (TypeError, ValueError):
            self.run = wandb.init(reinit=True, **kwargs)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        return {"run_id": run_id, "project": kwargs["project"]}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**_scalars(metrics), "step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowBackend(Backend):
    """An MLflow run through ``MlflowClient`` (no global active run); its id is kept for a resume.

    The tracking URI is ``mlflow={"tracking_uri": ...}``, else ``MLFLOW_TRACKING_URI``, else a file store
    in ``run_dir/mlruns`` (MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``, which
    the tracker then sets). MLflow cannot delete values: after a resume, steps logged between the
    checkpoint and the crash stay, and the resumed values are appended at the same steps.
    """

    name = "mlflow"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        from mlflow.tracking import MlflowClient

        uri = run.options.get("tracking_uri") or run.state.get("tracking_uri")
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or (run.run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
        self.client = MlflowClient(tracking_uri=uri)
        experiment = run.options.get("experiment", "ratlib")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_id = run.state.get("run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        self.run_id: str = run_id
        if run.config:
            from mlflow.entities import Param

            text = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in run.config.items()}
            params = [Param(k, v[:500]) for k, v in sorted(text.items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        return {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in _scalars(metrics).items() if math.isfinite(v)]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_BUILTIN: dict[str, type[Backend]] = {
    "jsonl": JsonlBackend,
    "tensorboard": TensorBoardBackend,
    "wandb": WandbBackend,
    "mlflow": MlflowBackend,
}


def _installed(name: str) -> bool:
    if name == "tensorboard":
        return (
            importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
        )
    if name in ("wandb", "mlflow"):
        return importlib.util.find_spec(name) is not None
    return True


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


def _is_main() -> bool:
    """The main rank, as ``ratlib.dist_init`` decides; an unknown rank (bad launcher variables) is not."""
    from ratlib.dist_init import is_main_process
    from ratlib.launch import DistInitError

    try:
        return is_main_process()
    except DistInitError:
        return False


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
            if not _installed(key):
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

"""The tracking destinations: ``Backend`` (subclass it for your own), metrics.jsonl, TensorBoard, W&B and MLflow.
Every method runs on the backend's own worker thread (``ratlib.tracking.tracker``); the backend packages are
imported there, never at import time."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratlib.errors import RatlibError, message
from ratlib.tracking.values import _plain, _scalars

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
FSYNC_SECS = 10.0  # metrics.jsonl: at most this long between fsyncs (also one at every flush and at close)

_HINTS = {
    "tensorboard": "pip install 'ratlib[tensorboard]'",
    "wandb": "pip install 'ratlib[wandb]'",
    "mlflow": "pip install 'ratlib[mlflow]'",
}


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


class BackendNotImplementedError(RatlibError, NotImplementedError):
    """A ``Backend`` subclass that does not define ``log`` (the tracker drops it with a warning)."""


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
        raise BackendNotImplementedError(
            message(f"{type(self).__name__}.log is not written", fix="a Backend subclass defines log(metrics, step)")
        )

    def flush(self) -> None:
        """Make what was logged so far durable or visible (``Tracker.flush``)."""

    def close(self) -> None:
        """Flush and release the destination; called once, at ``Tracker.close``."""


class JsonlBackend(Backend):
    """``run_dir/metrics.jsonl``: one ``{"step": ..., **metrics}`` line per ``log``, each in one ``write`` to a file
    kept open for appending (a reader, ``ratlib.io.read_jsonl``, skips a cut-off last line).

    Durability: a line is in the operating system's hands once written, so a crash of the process loses none; an
    fsync makes it survive a crash of the machine too. It comes at ``flush()`` (a checkpoint flushes the tracker
    first) and ``close()``, and after a write once ``fsync_secs`` (option, default 10) have passed since the last:
    a machine crash or power loss may lose the lines of the last ``fsync_secs`` seconds. An fsync per line cost
    1.5 to 2% of a small CPU step (docs/tracking.md).
    """

    name = "jsonl"
    _fd: int | None = None  # the open file, from start to close

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        """Open ``run_dir/metrics.jsonl`` for appending; a resume first drops the rows after its step."""
        from ratlib.io import read_jsonl, write_atomic

        self.path = run.run_dir / run.options.get("filename", "metrics.jsonl")
        self.fsync_secs = float(run.options.get("fsync_secs", FSYNC_SECS))
        if run.resume_step is not None and self.path.exists():
            rows = read_jsonl(self.path)
            kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= run.resume_step]
            if len(kept) != len(rows):
                write_atomic(self.path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._synced_at = time.monotonic()
        self._unsynced = False
        return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One line, one ``write()``; fsynced at most every ``fsync_secs``."""
        if self._fd is None:
            return
        os.write(self._fd, (json.dumps({"step": step, **metrics}, allow_nan=True) + "\n").encode("utf-8"))
        self._unsynced = True
        if time.monotonic() - self._synced_at >= self.fsync_secs:
            self.flush()

    def flush(self) -> None:
        """Fsync what was written (a checkpoint calls it before it saves)."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False
        self._synced_at = time.monotonic()

    def close(self) -> None:
        """Fsync and close the file."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)


class TensorBoardBackend(Backend):
    """Event files in ``run_dir`` (torch's ``SummaryWriter``, or tensorboardX); ``purge_step`` on a resume."""

    name = "tensorboard"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        """A ``SummaryWriter`` on ``run_dir``; a resume purges the steps after its step."""
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
        """The record's numbers as scalars at ``step``."""
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Write the pending events."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer."""
        self.writer.close()


class WandbBackend(Backend):
    """A W&B run; its id is kept in the state, so a resume continues it (``resume="allow"``).

    W&B drops a value whose ``step=`` is below the run's current step, so the training step is logged as
    the metric ``step`` (``define_metric(step_metric=...)``) and W&B's own counter only increases.
    """

    name = "wandb"

    def start(self, run: BackendStart) -> dict[str, Any] | None:
        """Start the W&B run, or resume the one whose id the state holds."""
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
        """The record's numbers at ``step``."""
        self.run.log({**_scalars(metrics), "step": step})

    def close(self) -> None:
        """Finish the run."""
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
        """Start the MLflow run, or continue the one whose id the state holds."""
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
        """The record's numbers as metrics at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in _scalars(metrics).items() if math.isfinite(v)]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def close(self) -> None:
        """End the run."""
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

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

from ratlib.tracking.backends import BACKENDS, Backend, BackendStart
from ratlib.tracking.outcome import OUTCOME_FILE, read_outcome, run_outcome, write_outcome
from ratlib.tracking.tracker import STATE_FILE, Tracker
from ratlib.tracking.values import TrackingError, flatten_config, log_step, lr_metrics, memory_metrics

__all__ = [
    "BACKENDS",
    "OUTCOME_FILE",
    "STATE_FILE",
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

"""Deprecated (one release): the run folder is ``ratlib.checkpoint.RunCheckpoints`` (save, resume, tracker),
the step line ``ratlib.tracking.log_step`` and the end of preemption handling ``ratlib.preempt.installed``.

A training run's folder at run time: checkpoints/ (written atomically by the main rank, plain data only),
the resume from the latest one (weights, optimiser, schedule, sampler position mid-epoch, every rank's RNGs),
the tracker that continues the checkpoint's run, and the per-step log line. The examples' train.py files use
these, so each piece has one implementation.

Everything a checkpoint holds loads with ``torch.load(path, weights_only=True)``. torch is imported only where
it is used (``import ratlib.config_defaults`` stays torch-free).
"""

from __future__ import annotations

import json
import math
import os
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratlib import checkpoint, preempt
from ratlib.config_defaults.args import UsageError
from ratlib.io import write_atomic
from ratlib.launch import is_main_process
from ratlib.rank_logger import get_logger
from ratlib.tracking import Tracker, lr_metrics

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ratlib.strategy import Stepper

__all__ = [
    "checkpoint_dir",
    "checkpoint_to_evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "log_step",
    "make_tracker",
    "release_preemption",
    "resume_from",
    "save_checkpoint",
    "save_state",
    "write_eval",
]

log = get_logger(__name__)

warnings.warn(
    "ratlib.config_defaults.run_folder is deprecated and goes in the next release: use ratlib.checkpoint."
    "RunCheckpoints, ratlib.tracking.log_step and ratlib.preempt.installed",
    DeprecationWarning,
    stacklevel=2,
)


def checkpoint_dir(run_dir: Path) -> Path:
    """The folder of the run's checkpoints: ``run_dir/checkpoints``."""
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int | None) -> Path:
    """checkpoints/epoch{E}.pt, written atomically by the main rank; every rank calls it and waits (a test may
    replace it here to crash mid-save). A
    mid-epoch (preemption) checkpoint has the same name: the end of that epoch replaces it."""
    return checkpoint.save(state, checkpoint_dir(run_dir) / f"epoch{state['epoch']:04d}.pt", keep=keep)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint (``epoch*.pt``, by number), None when it has none."""
    return checkpoint.latest(checkpoint_dir(run_dir), "epoch*.pt")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Every rank reads the checkpoint onto the CPU (weights_only: plain data only); a damaged file is the
    user's input error."""
    try:
        return checkpoint.load(path, map_location="cpu", weights_only=True)
    except checkpoint.CheckpointError as exc:
        raise UsageError(str(exc)) from exc


def make_tracker(cfg: Any, run_dir: Path, resumed: dict[str, Any] | None) -> Tracker:
    """Metrics from the main rank to ``tracking.backends`` (metrics.jsonl, TensorBoard, ...): a resume
    continues the checkpoint's run, dropping what the run logged after the checkpoint's step."""
    state = (resumed or {}).get("tracker")
    # a checkpoint without the tracker's state (an older one) continues from run_dir's tracking.json
    resume: bool | dict[str, Any] = state if state is not None else resumed is not None
    return Tracker(run_dir, backends=cfg.tracking.backends, config=cfg, resume=resume)


def resume_from(run_dir: Path, model: nn.Module, stepper: Stepper, sampler: Any, how: Any) -> dict[str, Any] | None:
    """Weights, optimiser, schedule, sampler position (mid-epoch too) and every rank's RNGs from the latest
    checkpoint; returns it (None without one). ``how``: True (``--resume``: warn when there is none) or
    "auto" (quietly start anew)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        if how is True:
            log.warning("--resume: no checkpoint under %s; starting from scratch", checkpoint_dir(run_dir))
        return None
    state = load_checkpoint(path)
    stepper.load_state_dict(state, checkpoint_dir(run_dir) / "deepspeed", path)  # the model's weights too
    sampler.load_state_dict(state.get("sampler") or {"epoch": state["epoch"], "position": len(sampler)})
    if state.get("rng"):
        checkpoint.set_rng_state(state["rng"])
    where = "mid-epoch" if sampler.epoch == state["epoch"] else "done"
    log.info("resumed from %s: epoch %d %s, step %d", path, state["epoch"], where, state["step"])
    return state


def save_state(
    run_dir: Path, model: nn.Module, stepper: Stepper, sampler: Any, cfg: Any, tracker: Tracker, **state: Any
) -> Path:
    """A checkpoint (every rank calls it): DeepSpeed's own state first, then epoch{E}.pt with the weights,
    optimiser, schedule, scaler, sampler position (``position``: batches consumed, mid-epoch), every rank's
    RNGs, the tracker's state and ``state`` (epoch, step, metrics)."""
    keep, position = cfg.checkpoint.keep, state.pop("position", None)
    stepper.save(checkpoint_dir(run_dir) / "deepspeed", state["epoch"], state["step"], keep)
    tracker.flush(timeout=30)  # what the checkpoint's step covers is on disk before the checkpoint is
    state.update(**stepper.state_dict())  # the model's weights too
    state.update(sampler=sampler.state_dict(position=position), rng=checkpoint.rng_state())
    state.update(tracker=tracker.state_dict(), config=cfg.model_dump(mode="json"))
    return save_checkpoint(run_dir, state, keep)


def release_preemption(pre: Any) -> None:
    """At the end of train(), when it installed ``ratlib.preempt``: the earlier signal handlers back (a test
    process, the next run of a study). A signal that came after the last agreement is sent again, so that
    it meets the handler it would have met without us (default: end the process) and is not lost."""
    late = pre.signal if pre.requested and pre.stop_step is None else None
    preempt.uninstall()
    if late is not None:
        log.warning("%s after the last stop agreement: passing it on", late)
        os.kill(os.getpid(), getattr(signal, late))


def checkpoint_to_evaluate(run_dir: Path, path: str | Path | None) -> Path:
    """``--eval-only``: the checkpoint given, or the run folder's latest; a UsageError when there is none."""
    found = Path(path) if path is not None else latest_checkpoint(run_dir)
    if found is None or not found.is_file():
        raise UsageError(
            f"--eval-only: checkpoint {found or checkpoint_dir(run_dir) / 'epoch*.pt'} not found (no checkpoint "
            f"under {checkpoint_dir(run_dir)}); pass --checkpoint PATH or the output_dir of a finished run"
        )
    return found


def log_step(
    cfg: Any,
    tracker: Tracker,
    epoch: int,
    step: int,
    loss: torch.Tensor,
    optimizer: Any,
    seconds_per_step: float,
    **terms: Any,
) -> None:
    """Every ``training.log_every`` optimiser steps (and the last): the loss, the learning rate and the pace,
    to the log and the tracker. A non-finite loss or gradient is ``training.numerics``'s (``ratlib.numerics``,
    at the step it appears, on every rank), not this function's."""
    t = cfg.training
    if step % t.log_every and step != t.max_steps:
        return
    value = loss.item()
    if not math.isfinite(value):  # training.numerics (ratlib.numerics) stops at the step itself unless it is off
        log.warning("epoch %d, step %d: the loss is %s (training.numerics.policy is off)", epoch, step, value)
    lrs = lr_metrics(optimizer)
    tracker.log({"train/loss": value, **{f"train/{k}": v for k, v in terms.items()}, **lrs}, step)
    lr = next(iter(lrs.values()))
    log.info("epoch %d step %d: loss %.4f lr %.3g (%.3f s/step)", epoch, step, value, lr, seconds_per_step)


def write_eval(run_dir: Path, path: Path, metrics: dict[str, float]) -> None:
    """``--eval-only``'s figures in run_dir/eval.json, by the main rank."""
    if is_main_process():
        write_atomic(run_dir / "eval.json", json.dumps({"checkpoint": str(path), **metrics}, indent=1) + "\n")

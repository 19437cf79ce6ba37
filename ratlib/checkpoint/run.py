"""A training run's checkpoints as one object: ``RunCheckpoints(run_dir)`` saves and resumes everything a run
needs to continue as if nothing had happened (weights, optimiser, schedule, scaler, the sampler's position
mid-epoch, every rank's RNGs, the tracker's state, the config) in one call each, and prunes.

The format follows the state: ``checkpoints/epoch{E}.pt`` (written by the main rank) for whole weights,
``checkpoints/epoch{E}/`` (a sharded folder, every rank writing its shards, visible once committed) for an
FSDP2 stepper. A mid-epoch (preemption) checkpoint has its epoch's name: the end of that epoch replaces it.
Each start of the run (the first, and every resume, on whatever number of ranks) is a *segment*; the
segments, with their world size and first step, go into every checkpoint and ``run_dir/segments.json``.

The stepper, the sampler and the tracker are duck-typed (``ratlib.strategy.Stepper``,
``ratlib.data.ShardedBatchSampler``, ``ratlib.tracking.Tracker``), so this module imports neither.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ratlib.checkpoint.files import CheckpointNotFoundError, latest, load, rng_state, save, set_rng_state
from ratlib.errors import message
from ratlib.io import write_atomic
from ratlib.launch import get_world_size, is_main_process
from ratlib.rank_logger import get_logger

__all__ = ["RunCheckpoints"]

log = get_logger("ratlib.checkpoint")

PATTERN = "epoch*"


class RunCheckpoints:
    """The checkpoints under ``run_dir/checkpoints``; ``keep``: how many to keep (None: all)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, keep: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.keep = keep
        self.segments: list[dict[str, Any]] = []
        self.resumed: dict[str, Any] | None = None  # the checkpoint resume() continued from
        self.step = 0  # the optimiser step the run starts at (the resumed checkpoint's)
        self._tracker: Any = None
        self._config: Any = None

    def latest(self) -> Path | None:
        """The newest committed checkpoint (file or sharded folder), or None."""
        return latest(self.folder, PATTERN)

    def save(
        self,
        stepper: Any,
        sampler: Any,
        *,
        epoch: int,
        step: int,
        tracker: Any = None,
        config: Any = None,
        position: int | None = None,
        **extra: Any,
    ) -> Path:
        """A checkpoint; every rank calls it. ``position``: the batches of ``epoch`` consumed (a mid-epoch stop),
        None at an epoch's end. ``extra``: more plain data (``metrics``, ...). DeepSpeed's own state is written
        first, to ``checkpoints/deepspeed``; the tracker (default: the one ``tracker()`` made) is flushed first,
        so what the step covers is on disk, and its state saved; ``config``: default, the one given to ``tracker()``."""
        tracker = tracker if tracker is not None else self._tracker
        config = config if config is not None else self._config
        stepper.save(self.folder / "deepspeed", epoch, step, self.keep)
        if tracker is not None:
            tracker.flush(timeout=30)
        state: dict[str, Any] = {"epoch": epoch, "step": step, **extra, **stepper.state_dict()}
        state.update(sampler=sampler.state_dict(position=position), rng=rng_state(), segments=self._segments(step))
        if tracker is not None:
            state["tracker"] = tracker.state_dict()
        if config is not None:
            state["config"] = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        name = f"epoch{epoch:04d}" + ("" if getattr(stepper, "sharded", False) else ".pt")
        path = save(state, self.folder / name, keep=self.keep)
        # the same epoch in the other format (a run resumed on another number of ranks, sharded or not) is older
        other = self.folder / (f"epoch{epoch:04d}" if path.suffix == ".pt" else f"epoch{epoch:04d}.pt")
        if is_main_process() and other.exists():
            shutil.rmtree(other) if other.is_dir() else other.unlink()
        return path

    def resume(self, stepper: Any, sampler: Any, how: bool | str = True) -> dict[str, Any] | None:
        """Continue from the latest checkpoint: weights, optimiser, schedule, scaler, the sampler's position
        (mid-epoch too, also on another number of ranks with a global batch) and every rank's RNGs; returns
        the checkpoint's state (its ``tracker`` entry continues the tracker), None without one. ``how``: True
        (``--resume``: warn when there is none), "auto" (start anew quietly) or False (no resume)."""
        path = self.latest() if how else None
        if path is None:
            if how is True:
                log.warning("--resume: no checkpoint under %s; starting from scratch", self.folder)
            self._start(0, None)
            return None
        state = self.load(path, stepper)
        stepper.load_state_dict(state, self.folder / "deepspeed", path)
        sampler.load_state_dict(state.get("sampler") or {"epoch": state["epoch"], "position": len(sampler)})
        if state.get("rng"):
            set_rng_state(state["rng"])
        self._start(state["step"], state)
        self.resumed, self.step = state, state["step"]
        where = "mid-epoch" if sampler.epoch == state["epoch"] else "done"
        log.info("resumed from %s: epoch %d %s, step %d", path, state["epoch"], where, state["step"])
        return state

    def tracker(self, config: Any, backends: Any = None) -> Any:
        """A ``ratlib.tracking.Tracker`` for this run folder (``backends``: default ``config.tracking.backends``)
        that continues the run ``resume()`` resumed: what was logged after the checkpoint's step is dropped, W&B
        and MLflow reuse their run. ``save()`` flushes it and keeps its state."""
        from ratlib.tracking import Tracker

        backends = backends if backends is not None else config.tracking.backends
        resume = (self.resumed or {}).get("tracker", self.resumed is not None)
        self._tracker, self._config = Tracker(self.run_dir, backends=backends, config=config, resume=resume), config
        return self._tracker

    def load(self, path: str | os.PathLike[str], stepper: Any = None) -> dict[str, Any]:
        """Every rank reads the checkpoint at ``path`` onto the CPU (plain data only: loading runs no code). A
        sharded folder is read into ``stepper``'s own (sharded) tensors when given, else as whole tensors."""
        path = Path(path)
        if path.is_dir():
            into = stepper.state_dict() if stepper is not None and getattr(stepper, "sharded", False) else None
            return load(path, into=into)
        return load(path, map_location="cpu", weights_only=True)

    def to_evaluate(self, path: str | os.PathLike[str] | None = None) -> Path:
        """``--eval-only``'s checkpoint: ``path``, or the run's latest; a CheckpointError when there is none."""
        found = Path(path) if path is not None else self.latest()
        if found is None or not found.exists():
            raise CheckpointNotFoundError(
                message(
                    f"--eval-only: checkpoint {found or self.folder / PATTERN} not found",
                    got=f"no checkpoint under {self.folder}" if found is None else None,
                    fix="pass --checkpoint PATH, or the output_dir of a run that saved one",
                )
            )
        return found

    def write_eval(self, path: str | os.PathLike[str], metrics: dict[str, Any]) -> Path:
        """``--eval-only``'s figures for the checkpoint at ``path``: ``run_dir/eval.json`` (the main rank writes
        it, atomically; every rank may call it)."""
        out = self.run_dir / "eval.json"
        if is_main_process():
            write_atomic(out, json.dumps({"checkpoint": str(path), **metrics}, indent=1) + "\n")
        return out

    def _segments(self, step: int) -> list[dict[str, Any]]:
        if not self.segments:  # a save before resume() was called: this start is the first segment
            self._start(step, None)
        return self.segments

    def _start(self, step: int, state: dict[str, Any] | None) -> None:
        """A new segment of the run at ``step`` on this number of ranks, after the checkpoint's own."""
        before = list((state or {}).get("segments") or [])
        segment = {"start_step": step, "world_size": get_world_size(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.segments = [*before, segment]
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"segments": self.segments}, indent=1) + "\n"
            write_atomic(self.run_dir / "segments.json", text)
        if before and before[-1].get("world_size") != segment["world_size"]:
            log.info(
                "this segment runs on %d ranks, the last one ran on %d (from step %d)",
                segment["world_size"],
                before[-1].get("world_size"),
                before[-1].get("start_step"),
            )

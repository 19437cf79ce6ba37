"""Medical image segmentation (Medical Segmentation Decathlon, 2D UNet) on one CPU or many GPUs.

    python examples/segmentation/train.py --config examples/segmentation/config.yaml
    torchrun --nproc_per_node 8 examples/segmentation/train.py --config examples/segmentation/config.yaml \
        data.root=/data/Task09_Spleen data.normalize=window training.strategy=fsdp2
    torchrun ... train.py --config ... training.resume=auto   # preemption-safe: requeues and restarts resume
    python examples/segmentation/train.py --config ... --eval-only [--checkpoint PATH]

With no ``data.root`` it trains on a small synthetic Decathlon task written into the run folder. Everything
lands under ``output_dir``: config.yaml (resolved), logs/rank{R}.log, metrics.jsonl and TensorBoard events
(``ratlib.tracking``), checkpoints/, cache/ (preprocessed volumes). Read it top to bottom: config, data,
model, loop, evaluation, train(), main(); the data set and the UNet are in seg_utils.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import ratlib
from ratlib import DataConfig, DistInfo, ExperimentConfig, ModelConfig, memory, preempt, strategy
from ratlib.checkpoint import RunCheckpoints
from ratlib.comm import broadcast_buffers, broadcast_object, gather_object, reduce_dict
from ratlib.config_defaults import UsageError, dump_config
from ratlib.data import gather_by_index
from ratlib.hang import heartbeat
from ratlib.numerics import Sentinel
from ratlib.rank_logger import get_logger, progress
from ratlib.script import run_script
from ratlib.tracking import Tracker, log_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # seg_utils.py sits beside this file
import seg_utils as su  # noqa: E402

log = get_logger("segmentation")


# ----------------------------------------------------------------------------------------------
# Config: ratlib's ExperimentConfig (training, distributed, ...) plus this example's data, model, eval


class SyntheticData(BaseModel):
    """The embedded default task, written into the run folder when ``data.root`` is null."""

    model_config = ConfigDict(extra="forbid")
    num_cases: int = Field(default=8, ge=2)
    shape: tuple[int, int, int] = (64, 64, 16)  # x, y, z (slices)
    num_classes: int = Field(default=3, ge=2, le=8)  # background included: 3 = two organs
    seed: int = 0


class SegmentationData(DataConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    val_fraction: float = Field(default=0.25, gt=0, lt=1)  # share of the cases for validation (at least one)
    split_seed: int = 0  # the train/val split; the same on every rank and run
    normalize: Literal["zscore", "window"] = "zscore"  # window: clip to data.window (CT), scale to [-1, 1]
    window: tuple[float, float] = (-175.0, 250.0)  # Hounsfield units, an abdominal window
    patch_size: tuple[int, int] | None = None  # random training crops; null: whole slices
    flip: bool = True  # random flips along both in-plane axes
    empty_slices: float = Field(default=1.0, ge=0, le=1)  # share of training slices without foreground kept
    cache_dir: str | None = None  # preprocessed volumes; null: run folder/cache
    synthetic: SyntheticData = SyntheticData()


class SegmentationModel(ModelConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    feature_dims: int | list[int] = 16  # channels of the first level (doubling per level), or one per level
    num_blocks: int = Field(default=4, ge=1, le=8)  # levels, the bottleneck included: 4 = 3 poolings
    norm: Literal["batch", "instance", "group"] = "batch"
    loss: Literal["dice_ce", "ce"] = "dice_ce"  # ce: a mean over samples (a global batch splits exactly)


class SegmentationConfig(ExperimentConfig):
    output_dir: str = "runs/segmentation"
    data: SegmentationData = SegmentationData()
    model: SegmentationModel = SegmentationModel()


def check_settings(cfg: SegmentationConfig) -> None:
    """Settings that depend on each other (checked here, before any work, with a message that says what
    to change)."""
    dims, levels = cfg.model.feature_dims, cfg.model.num_blocks
    if isinstance(dims, list) and (len(dims) != levels or min(dims, default=0) < 1):
        raise UsageError(
            f"model.feature_dims={dims} gives {len(dims)} level width(s) but model.num_blocks={levels}: "
            "give one positive width per level, or one int (doubled per level)"
        )
    if isinstance(dims, int) and dims < 1:
        raise UsageError(f"model.feature_dims={dims}: expected a positive int (channels of the first level)")
    low, high = cfg.data.window
    if low >= high:
        raise UsageError(f"data.window=[{low}, {high}]: expected [low, high] with low < high, e.g. [-175, 250]")


# ----------------------------------------------------------------------------------------------
# Model (the data: seg_utils.build_datasets splits the task's cases, caches them, cuts them into 2D slices)


def build_model(cfg: SegmentationConfig, in_channels: int, num_classes: int) -> su.UNet:
    m = cfg.model
    return su.UNet(in_channels, num_classes, su.widths(m.feature_dims, m.num_blocks), norm=m.norm)


# ----------------------------------------------------------------------------------------------
# Training loop and evaluation


def train_one_epoch(
    stepper: strategy.Stepper, loader: Any, cfg: SegmentationConfig, device: torch.device, epoch: int, step: int,
    tracker: Tracker, pre: preempt.Preemption | None, numerics: Sentinel | None,
) -> tuple[int, float, list[int], int | None]:  # fmt: skip
    """One pass over this rank's batches (the rest of the epoch after a mid-epoch resume); returns the
    optimiser step reached, this rank's mean loss, the slice indices it trained on and, when every rank
    agreed to stop (a preemption, or training.numerics' "stop"), the batches of this epoch consumed (else
    None). Stops early at ``training.max_steps``. The loss stays on the device (one ``.item()`` every
    ``log_every`` steps)."""
    t, loss_fn = cfg.training, su.LOSSES[cfg.model.loss]
    autocast, memory_format = strategy.autocast_for(cfg, device), strategy.memory_format_for(cfg, device)
    stepper.model.train()
    loss_sum, done, seen = torch.zeros((), device=device), 0, []
    batches, start = len(loader), time.perf_counter()
    offset = loader.batch_sampler.batches_per_epoch - batches  # batches of this epoch done before a resume
    for i, (images, labels, index) in enumerate(progress(loader, desc=f"epoch {epoch}", leave=False)):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        seen.append(index)
        boundary = (i + 1) % stepper.accum == 0 or i + 1 == batches
        with stepper.no_sync(boundary):
            with autocast():
                logits = stepper.model(images)
            loss = loss_fn(logits, labels)
            stepper.backward(
                loss, weight=strategy.loss_weight(loader.batch_sampler, len(images), offset + i, stepper.accum)
            )
        loss_sum += loss.detach()
        done += 1
        # ratlib.numerics: the loss and gradients on every rank, one answer for all (skip, stop or raise)
        check = partial(numerics.check, step + 1, loss, indices=index.tolist()) if numerics is not None else None
        stepped = stepper.step(boundary, check=check)
        if stepped:
            step += 1
            heartbeat(step)  # ratlib.hang's watchdog
            per_step = (time.perf_counter() - start) / (i + 1) * stepper.accum
            log_step(tracker, step, loss, stepper.optimizer, every=t.log_every, last=t.max_steps, epoch=epoch,
                     seconds_per_step=per_step)  # fmt: skip
            if t.max_steps is not None and step >= t.max_steps:
                break
        # Every rank agrees at the same step (the epoch's last step is checked after its checkpoint).
        if (stepped or (numerics is not None and numerics.stopped)) and pre is not None and i + 1 < batches:
            if pre.should_stop(step):
                return step, float(loss_sum) / max(1, done), torch.cat(seen).tolist(), offset + i + 1
    indices = torch.cat(seen).tolist() if seen else []
    return step, float(loss_sum) / max(1, done), indices, None


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, cfg: SegmentationConfig, info: DistInfo) -> dict[str, float]:
    """Dice per class over all validation slices of all ranks, the same on every rank.

    Each rank counts pixels into a confusion matrix per slice; ``gather_by_index`` joins them on the main
    rank and checks that every slice was counted exactly once; Dice is computed once from the summed
    counts: the figure a single process gets on the whole set, not an average of per-rank Dice.
    """
    device, start = info.device, time.perf_counter()
    autocast, memory_format = strategy.autocast_for(cfg, device), strategy.memory_format_for(cfg, device)
    was_training = model.training
    model.eval()
    per_slice: dict[int, np.ndarray] = {}
    for images, labels, index in loader:
        with autocast():
            logits = model(images.to(device, non_blocking=True, memory_format=memory_format))
        counts = su.confusion_per_sample(logits, labels.to(device, non_blocking=True)).cpu().numpy()
        per_slice.update(zip(index.tolist(), counts))
        heartbeat(-1)  # progress for ratlib.hang's stall watchdog (step -1: evaluating)
    model.train(was_training)
    merged = gather_by_index(per_slice, len(loader.dataset))
    metrics = None
    if merged is not None:  # the main rank
        metrics = su.dice_scores(sum(merged.values()))
        metrics.update(
            val_samples=len(merged), val_unique_samples=len(set(merged)), val_time_s=time.perf_counter() - start
        )
    return broadcast_object(metrics)


# ----------------------------------------------------------------------------------------------
# train(): the whole run


def train(
    cfg: SegmentationConfig, *, run_dir: str | Path | None = None, resume: bool = False, info: DistInfo | None = None
) -> dict[str, float]:
    """Train and validate on an already initialised process group (or a single process); returns the
    final validation metrics (``dice``, ``dice_1``, ...) on every rank.

    ``info``: the ``DistInfo`` from the caller's ``distributed()``; by default ``init_distributed()``
    (idempotent) gives it. ``resume``: continue from the latest checkpoint under ``run_dir`` (also when
    ``training.resume`` says so). With ``training.preemption``, a SIGTERM or SIGUSR1 to any rank stops every
    rank at one step: a mid-epoch checkpoint, then ``SystemExit(75)`` (``ratlib.preempt``).
    """
    check_settings(cfg)
    info = info or ratlib.init_distributed()
    device, t = info.device, cfg.training
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    strategy.report_findings(cfg, info.world_size, device, checks=EXAMPLE["checks"])  # model size, batch, ...
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    # Data: every training slice once per epoch across ranks (with its augmentation seed); each
    # validation slice on one rank.
    task, train_set, val_set = su.build_datasets(cfg, run_dir)
    model = build_model(cfg, train_set.in_channels, task.num_classes).to(device)
    sampler = strategy.train_sampler(cfg, len(train_set), info, augmentation_seeds=True)  # global/per-device
    collate = partial(su.pad_collate, multiple=model.multiple)  # sizes a multiple of the UNet's stride
    train_loader = strategy.train_loader(cfg, train_set, sampler, info, collate)
    val_loader = strategy.eval_loader(cfg, val_set, info, collate)
    accum, steps_per_epoch, total_steps = strategy.count_steps(cfg, sampler)  # optimiser steps

    # Model, precision, optimiser and schedule; DDP, FSDP2 or DeepSpeed (training.strategy).
    memory_format = strategy.memory_format_for(cfg, device)
    model = model.to(memory_format=memory_format)
    if t.compile:
        model.compile()  # in place: state_dict keys stay the same
    stepper = strategy.make_stepper(cfg, model, info, steps_per_epoch, total_steps, accum)
    widths = su.widths(cfg.model.feature_dims, cfg.model.num_blocks)
    log.info(
        f"UNet {widths}, {cfg.model.norm} norm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters{', channels_last' if memory_format == torch.channels_last else ''}"
    )

    # Resume: weights, optimiser, schedule, sampler position (mid-epoch too), counters, every rank's RNGs.
    checkpoints = RunCheckpoints(run_dir, keep=cfg.checkpoint.keep)
    checkpoints.resume(stepper, sampler, True if resume else t.resume)
    start_epoch, step = sampler.epoch, checkpoints.step
    tracker = checkpoints.tracker(cfg)  # metrics.jsonl, TensorBoard, ...: continues the resumed run

    def run_eval() -> dict[str, float]:
        broadcast_buffers(model)  # rank 0's BatchNorm statistics, which the checkpoint holds, on every rank
        with stepper.full_weights():  # FSDP2: gathered once, so ranks may run different numbers of batches
            return evaluate(model, val_loader, cfg, info)

    metrics: dict[str, float] = {}
    with tracker, preempt.installed(t.preemption) as pre:  # SIGTERM/SIGUSR1: every rank stops at one step
        sentinel = strategy.make_sentinel(cfg, stepper, run_dir, pre)  # training.numerics: NaN/Inf and drift
        for epoch in range(start_epoch, t.num_epochs):
            if step >= total_steps:
                break
            sampler.set_epoch(epoch)  # keeps a restored mid-epoch position
            metrics = {}  # this epoch's evaluation, when it has one
            memory.reset_peak_memory(device)
            epoch_start = time.perf_counter()
            step, loss, seen, stop = train_one_epoch(
                stepper, train_loader, cfg, device, epoch, step, tracker, pre, sentinel
            )
            last = epoch == t.num_epochs - 1 or step >= total_steps
            if stop is None:  # the epoch is done: its figures (collectives on every rank)
                train_time = time.perf_counter() - epoch_start
                metrics = end_of_epoch(
                    cfg, info, epoch, step, loss, seen, train_time, tracker, run_eval, sentinel, last
                )
            checkpoints.save(
                stepper, sampler, epoch=epoch, step=step, metrics=metrics if stop is None else {}, position=stop
            )
            if stop is None and last:
                break
            if pre is not None:  # every rank agreed (mid-epoch, or now): all leave together, exit code 75
                pre.exit_if_stopping(step, stopped=stop is not None, close=tracker.close)
        if not metrics:  # nothing left to train (a finished run resumed): evaluate what was loaded
            metrics = run_eval()
    return metrics


def end_of_epoch(
    cfg: SegmentationConfig, info: DistInfo, epoch: int, step: int, loss: float, seen: list[int], train_time: float,
    tracker: Tracker, run_eval: Callable[[], dict[str, float]], sentinel: Sentinel | None, last: bool,
) -> dict[str, float]:  # fmt: skip
    """The epoch's figures on every rank (collectives): validation (every ``eval.every_epochs`` and at the
    end), the mean loss over ranks, the slices trained on, peak memory; logged once, at the epoch's last step."""
    device = info.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    metrics = run_eval() if last or (epoch + 1) % cfg.eval.every_epochs == 0 else {}
    loss = reduce_dict({"loss": loss})["loss"]  # mean over ranks
    samples = [i for rank_ids in gather_object(seen) or [] for i in rank_ids]  # the main rank's view
    mem = memory.memory_report(device, warn_fraction=cfg.training.memory_warning_fraction)  # a collective
    record: dict[str, Any] = {"epoch": epoch, "train/epoch_loss": loss, "train_time_s": train_time}
    record.update(train_samples=len(samples), train_unique_samples=len(set(samples)))
    record.update(images_per_s=len(samples) / train_time, **metrics, **mem.to_metrics())
    record.update(numerics_skips=sentinel.skips if sentinel is not None else 0)  # steps skipped so far
    log.info(
        f"epoch {epoch} done: step {step}, loss {loss:.4f}, dice {metrics.get('dice', float('nan')):.4f}, "
        f"{len(samples)} slices ({len(set(samples))} unique) at {record['images_per_s']:.1f} images/s, "
        f"peak memory {record['peak_memory_max_gib']:.2f} GiB (rank {record['peak_memory_max_rank']})"
    )
    tracker.log(record, step)
    return metrics


def evaluate_checkpoint(
    cfg: SegmentationConfig,
    checkpoint_path: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """``--eval-only``: Dice of a checkpoint (default: the run folder's latest) on the validation cases;
    the figures also go to ``run_dir/eval.json``."""
    check_settings(cfg)
    info = info or ratlib.init_distributed()
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    checkpoints = RunCheckpoints(run_dir)
    path = checkpoints.to_evaluate(checkpoint_path)
    state = checkpoints.load(path)  # whole tensors, also from a sharded (FSDP2) checkpoint
    task, _, val_set = su.build_datasets(cfg, run_dir)
    model = build_model(cfg, val_set.in_channels, task.num_classes).to(info.device)
    model.load_state_dict(state["model"])
    log.info("evaluating %s (epoch %d, step %d)", path, state["epoch"], state["step"])
    loader = strategy.eval_loader(cfg, val_set, info, partial(su.pad_collate, multiple=model.multiple))
    metrics = evaluate(model, loader, cfg, info)
    checkpoints.write_eval(path, metrics)  # run_dir/eval.json
    return metrics


# The one entry the ablation driver (examples/ablation/run.py) reads to validate every run: the schema, the main
# metric and whether higher ("max") or lower ("min") is better.
EXAMPLE = {"schema": SegmentationConfig, "metric": "dice", "mode": "max", "checks": (su.size_rule,)}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: arguments, logging, config, the process group, then train() or --eval-only."""
    return run_script(argv, schema=SegmentationConfig, train=train, evaluate=evaluate_checkpoint, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

"""COCO object detection with torchvision models, on one CPU or many GPUs, with a mAP you can trust.

    python examples/detection/train.py --config examples/detection/config.yaml
    torchrun --nproc_per_node 8 examples/detection/train.py --config examples/detection/config.yaml \
        data.root=/data/coco model.name=fasterrcnn_resnet50_fpn
    torchrun ... train.py --config ... training.resume=auto   # preemption-safe: requeues and restarts resume
    python examples/detection/train.py --config ... --resume          # continue from the latest checkpoint
    python examples/detection/train.py --config ... --eval-only [--checkpoint PATH]

With no ``data.root`` it writes a small synthetic COCO set (coloured shapes) into the run folder and
trains on it. Everything lands under ``output_dir``: config.yaml (resolved), logs/rank{R}.log,
metrics.jsonl (a row every ``log_every`` steps and one per epoch; ``ratlib.tracking``, with
TensorBoard), checkpoints/. Read it top to bottom: config, data, loop, evaluation, checkpoints, train(),
main(); the data set, the models and the optimiser/DeepSpeed set-up are in detection_utils.py.
``EXAMPLE`` at the end is what the ablation runner (and any Python caller) uses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import ratlib
from ratlib import DataConfig, DistInfo, ExperimentConfig, ModelConfig, memory, preempt, strategy
from ratlib.checkpoint import RunCheckpoints
from ratlib.comm import broadcast_buffers, broadcast_object, gather_object, reduce_dict
from ratlib.config_defaults import CheckpointConfig, EvalConfig, dump_config
from ratlib.hang import heartbeat
from ratlib.numerics import Sentinel
from ratlib.rank_logger import get_logger, progress
from ratlib.script import run_script
from ratlib.tracking import Tracker, log_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # detection_utils.py sits beside this file
import detection_utils as du  # noqa: E402

log = get_logger("detection")


# ----------------------------------------------------------------------------------------------
# Config: ratlib's ExperimentConfig (training, distributed, ...) plus this example's data, model, eval


class SyntheticData(BaseModel):
    """The embedded default data set, written into the run folder when ``data.root`` is null."""

    model_config = ConfigDict(extra="forbid")
    train_images: int = Field(default=64, gt=0)
    val_images: int = Field(default=32, gt=0)
    image_size: int = Field(default=128, ge=32)
    seed: int = 0


class DetectionData(DataConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    train_split: str = "train2017"  # any spelling ratlib.coco_paths accepts: train, 2017_train, ...
    val_split: str = "val2017"
    layout: Literal["auto", "coco", "roboflow", "detectron2"] = "auto"
    keep_empty: bool = False  # train on images without boxes too (as negatives)
    synthetic: SyntheticData = SyntheticData()


class DetectionModel(ModelConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str = "fasterrcnn_mobilenet_v3_large_fpn"  # any torchvision detection model, or fasterrcnn_tiny
    weights: str | None = None  # a local checkpoint / state_dict file for the whole model
    backbone_weights: str | None = None  # a local file, or a torchvision weights name (e.g. DEFAULT: downloads)
    min_size: int | None = Field(default=None, gt=0)  # resize shorter side (null: the model's default, 800 for R-CNNs)
    max_size: int | None = Field(default=None, gt=0)
    width: int = Field(default=32, ge=4)  # fasterrcnn_tiny only
    sync_bn: bool = False  # SyncBatchNorm across ranks
    kwargs: dict[str, Any] = {}  # more keyword arguments for the torchvision builder


class DetectionEval(EvalConfig):
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"  # auto: faster-coco-eval if installed


class DetectionConfig(ExperimentConfig):
    output_dir: str = "runs/detection"
    data: DetectionData = DetectionData()
    model: DetectionModel = DetectionModel()
    eval: DetectionEval = DetectionEval()
    checkpoint: CheckpointConfig = CheckpointConfig(keep=None)  # every epoch's checkpoint stays


# ----------------------------------------------------------------------------------------------
# Training loop


def train_one_epoch(
    stepper: strategy.Stepper, loader: Any, cfg: DetectionConfig, device: torch.device, epoch: int, step: int,
    tracker: Tracker, pre: preempt.Preemption | None, numerics: Sentinel | None,
) -> tuple[int, dict[str, float], list[int], int | None]:  # fmt: skip
    """One pass over this rank's batches (the rest of the epoch after a mid-epoch resume); returns the
    optimiser step reached, this rank's mean losses, the image ids it trained on and, when every rank agreed
    to stop (a preemption, or training.numerics' "stop"), the batches of this epoch consumed (else None).
    Stops early at ``training.max_steps``."""
    t, autocast = cfg.training, strategy.autocast_for(cfg, device)
    stepper.model.train()
    sums: dict[str, torch.Tensor] = {}
    image_ids: list[int] = []
    done, batches, start = 0, len(loader), time.perf_counter()
    offset = loader.batch_sampler.batches_per_epoch - batches  # batches of this epoch done before a resume

    def means() -> dict[str, float]:
        return {k: float(v) / max(1, done) for k, v in sums.items()}

    for i, (images, targets) in enumerate(progress(loader, desc=f"epoch {epoch}", leave=False)):
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tg.items()} for tg in targets]
        ids = [tg["image_id"] for tg in targets]
        image_ids += ids
        boundary = (i + 1) % stepper.accum == 0 or i + 1 == batches
        with stepper.no_sync(boundary):
            with autocast():
                loss_dict = stepper.model(images, targets)
                loss = sum(loss_dict.values())
            weight = strategy.loss_weight(loader.batch_sampler, len(images), offset + i, stepper.accum)
            stepper.backward(loss, weight=weight)
        for k, v in (("loss", loss), *loss_dict.items()):
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        done += 1
        # ratlib.numerics: the loss and gradients on every rank, one answer for all (skip, stop or raise)
        check = partial(numerics.check, step + 1, loss, indices=ids) if numerics is not None else None
        stepped = stepper.step(boundary, check=check)
        if stepped:
            step += 1
            log_step(tracker, step, loss, stepper.optimizer, every=t.log_every, last=t.max_steps, epoch=epoch,
                     seconds_per_step=(time.perf_counter() - start) / (i + 1) * stepper.accum, **loss_dict)  # fmt: skip
            heartbeat(step)  # ratlib.hang's watchdog: this rank made progress
            if t.max_steps is not None and step >= t.max_steps:
                break
        # Every rank agrees at the same step (the epoch's last step is checked after its checkpoint).
        if (stepped or (numerics is not None and numerics.stopped)) and pre is not None and i + 1 < batches:
            if pre.should_stop(step):
                return step, means(), image_ids, offset + i + 1
    return step, means(), image_ids, None


# ----------------------------------------------------------------------------------------------
# Evaluation: du.evaluate (every rank predicts its share, the main rank runs COCOeval once)


def evaluate(model: nn.Module, loader: Any, val_set: du.CocoDetection, cfg: DetectionConfig, info: DistInfo) -> dict:
    """The COCO figures on every rank."""
    autocast = strategy.autocast_for(cfg, info.device)
    return broadcast_object(
        du.evaluate(model, loader, val_set, info.device, autocast=autocast, backend=cfg.eval.backend)
    )


# ----------------------------------------------------------------------------------------------
# train(): the whole run


def train(
    cfg: DetectionConfig, *, run_dir: str | Path | None = None, resume: bool = False, info: DistInfo | None = None
) -> dict[str, float]:
    """Train and evaluate on an already-initialised process group (or a single process); returns the
    final validation metrics (``map``, ``map50``, ... as ``du.STAT_NAMES``) on every rank.

    ``info``: the ``DistInfo`` from the caller's ``distributed()``; by default ``init_distributed()``
    (idempotent) gives it. ``resume``: continue from the latest checkpoint under ``run_dir`` (also when
    ``training.resume`` says so). With ``training.preemption``, a SIGTERM or SIGUSR1 to any rank stops every
    rank at one step: a mid-epoch checkpoint, then ``SystemExit(75)`` (``ratlib.preempt``).
    """
    info = info or ratlib.init_distributed()
    device, t = info.device, cfg.training
    du.check_model_name(cfg.model.name)  # before the data is read
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    strategy.report_findings(cfg, info.world_size, device)  # risky settings; resolve_coco reports the data paths
    torch.manual_seed(t.seed)

    # Data: each rank trains on its share of every epoch's images (grouped by aspect ratio) and predicts
    # on its share of val.
    train_set, val_set = du.build_datasets(cfg, run_dir, masks=cfg.model.name.startswith("maskrcnn"))
    groups = train_set.aspect_groups()
    # global or per-device batches; each image's flip drawn from its own seed (the same after any resume)
    sampler = strategy.train_sampler(cfg, len(train_set), info, group_ids=groups, augmentation_seeds=True)
    train_loader = strategy.train_loader(cfg, train_set, sampler, info, du.collate)
    val_loader = strategy.eval_loader(cfg, val_set, info, du.collate)
    accum, steps_per_epoch, total_steps = strategy.count_steps(cfg, sampler)  # optimiser steps

    # Model, precision, optimiser and schedule; DDP, FSDP2 or DeepSpeed (training.strategy).
    model = du.build_model(cfg.model, train_set.num_classes).to(device)
    if cfg.model.sync_bn and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=strategy.memory_format_for(cfg, device))
    if t.compile:
        model.backbone.compile()  # in place: state_dict keys stay the same
    stepper = strategy.make_stepper(cfg, model, info, steps_per_epoch, total_steps, accum)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    log.info("model %s: %.2fM parameters, %d classes", cfg.model.name, size, train_set.num_classes - 1)

    # Resume: weights, optimiser, schedule, sampler position (mid-epoch too), counters, every rank's RNGs.
    checkpoints = RunCheckpoints(run_dir, keep=cfg.checkpoint.keep)
    checkpoints.resume(stepper, sampler, True if resume else t.resume)
    start_epoch, step = sampler.epoch, checkpoints.step

    metrics: dict[str, float] = {}
    # the tracker (metrics.jsonl, TensorBoard, ...) continues the resumed run; SIGTERM/SIGUSR1 stop every rank
    with checkpoints.tracker(cfg) as tracker, preempt.installed(t.preemption) as pre:
        sentinel = strategy.make_sentinel(cfg, stepper, run_dir, pre)  # training.numerics: NaN/Inf and drift
        for epoch in range(start_epoch, t.num_epochs):
            if step >= total_steps:
                break
            sampler.set_epoch(epoch)  # keeps a restored mid-epoch position
            memory.reset_peak_memory(device)  # per-epoch peaks, on every rank
            epoch_start = time.perf_counter()
            step, losses, seen, stop = train_one_epoch(
                stepper, train_loader, cfg, device, epoch, step, tracker, pre, sentinel
            )
            train_time = time.perf_counter() - epoch_start  # before the evaluation
            last = epoch == t.num_epochs - 1 or step >= total_steps
            if stop is None:  # the epoch is done: its figures (collectives on every rank)
                broadcast_buffers(model)  # rank 0's BatchNorm statistics, which the checkpoint holds, everywhere
                evaluating = last or (epoch + 1) % cfg.eval.every_epochs == 0
                with stepper.full_weights():  # FSDP2: gathered once, ranks may run different numbers of batches
                    metrics = evaluate(model, val_loader, val_set, cfg, info) if evaluating else {}
                log_epoch(cfg, info, tracker, epoch, step, losses, seen, train_time, metrics, sentinel)
            checkpoints.save(
                stepper, sampler, epoch=epoch, step=step, metrics=metrics if stop is None else {}, position=stop
            )
            if stop is None and last:
                break
            # a stop agreed mid-epoch, or one every rank agrees to now: all leave together, exit code 75
            if pre is not None:
                pre.exit_if_stopping(step, stopped=stop is not None, close=tracker.close)
        if not metrics:  # nothing left to train (a finished run resumed): evaluate what was loaded
            with stepper.full_weights():
                metrics = evaluate(model, val_loader, val_set, cfg, info)
    return metrics


def log_epoch(
    cfg: DetectionConfig, info: DistInfo, tracker: Tracker, epoch: int, step: int, losses: dict[str, float],
    seen: list[int], train_time: float, metrics: dict[str, float], sentinel: Sentinel | None,
) -> None:  # fmt: skip
    """The epoch's figures (collectives: every rank calls it), logged once, at the epoch's last step: the mean
    losses over ranks, the images trained on, the COCO figures, peak memory."""
    losses = reduce_dict(losses)  # mean over ranks
    images = [i for rank_ids in gather_object(seen) or [] for i in rank_ids]  # the main rank's view
    mem = memory.memory_report(info.device, warn_fraction=cfg.training.memory_warning_fraction)  # a collective
    record: dict[str, Any] = {
        "epoch": epoch,
        **{f"train/epoch_{k}": v for k, v in losses.items()},
        "train_images": len(images),
        "train_unique_images": len(set(images)),
        "train_time_s": train_time,
        "images_per_s": len(images) / train_time,
        **metrics,
        **mem.to_metrics(),
        "numerics_skips": sentinel.skips if sentinel is not None else 0,  # steps skipped so far
    }
    log.info(
        f"epoch {epoch} done: step {step}, loss {record['train/epoch_loss']:.4f}, "
        f"map {metrics.get('map', float('nan')):.4f}, map50 {metrics.get('map50', float('nan')):.4f}, "
        f"{len(images)} images ({len(set(images))} unique) at {record['images_per_s']:.1f} images/s"
    )
    tracker.log(record, step)


def evaluate_checkpoint(
    cfg: DetectionConfig, checkpoint_path: str | Path | None = None, *, run_dir: str | Path | None = None,
    info: DistInfo | None = None,
) -> dict[str, float]:  # fmt: skip
    """``--eval-only``: COCO evaluation of a checkpoint (default: the run folder's latest) on the val split;
    the figures also go to ``run_dir/eval.json``."""
    info = info or ratlib.init_distributed()
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    checkpoints = RunCheckpoints(run_dir)
    path = checkpoints.to_evaluate(checkpoint_path)
    _, val_set = du.build_datasets(cfg, run_dir, masks=False)
    model = du.build_model(cfg.model, val_set.num_classes).to(info.device)
    model.load_state_dict(checkpoints.load(path)["model"])  # whole tensors, also from a sharded checkpoint
    log.info("evaluating %s", path)
    metrics = evaluate(model, strategy.eval_loader(cfg, val_set, info, du.collate), val_set, cfg, info)
    checkpoints.write_eval(path, metrics)  # run_dir/eval.json
    return metrics


# The one entry the ablation driver (examples/ablation/run.py) reads to validate every run: the schema, the main
# metric and whether higher ("max") or lower ("min") is better.
EXAMPLE = {"schema": DetectionConfig, "metric": "map", "mode": "max", "checks": ()}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: arguments, logging, config, the process group, then train() or --eval-only."""
    return run_script(argv, schema=DetectionConfig, train=train, evaluate=evaluate_checkpoint, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

"""COCO object detection with torchvision models, on one CPU or many GPUs, with a mAP you can trust.

    python examples/detection/train.py --config examples/detection/config.yaml
    torchrun --nproc_per_node 8 examples/detection/train.py --config examples/detection/config.yaml \
        data.root=/data/coco model.name=fasterrcnn_resnet50_fpn
    python examples/detection/train.py --config ... --resume          # continue from the latest checkpoint
    python examples/detection/train.py --config ... --eval-only [--checkpoint PATH]

With no ``data.root`` it writes a small synthetic COCO set (coloured shapes) into the run folder and
trains on it. Everything lands under ``output_dir``: config.yaml (resolved), logs/rank{R}.log,
metrics.jsonl (one row per epoch), checkpoints/. Read it top to bottom: config, logging, init, data,
model, loop, evaluation, checkpoint. ``train(cfg)`` is importable (the ablation runner calls it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import ratlib
from ratlib import (
    CocoPathError,
    ConfigError,
    DistInfo,
    ExperimentConfig,
    broadcast_object,
    check_config,
    checkpoint,
    distributed,
    dump_config,
    gather_object,
    get_logger,
    load_config,
    main_process_first,
    memory,
    progress,
    reduce_dict,
    resolve_coco,
    setup_logging,
    to_deepspeed_config,
)
from ratlib.config_defaults import DataConfig, ModelConfig
from ratlib.hang import heartbeat

sys.path.insert(0, str(Path(__file__).resolve().parent))  # detection_utils.py sits beside this file
import detection_utils as du  # noqa: E402

log = get_logger("detection")


class UsageError(ValueError):
    """A problem with the user's input (config, paths, checkpoint): printed without a traceback."""


# ----------------------------------------------------------------------------------------------
# Config: ratlib's ExperimentConfig (training, distributed, ...) plus this example's data, model, eval


class SyntheticData(BaseModel):
    """The embedded default data set, written into the run folder when ``data.root`` is null."""

    model_config = ConfigDict(extra="forbid")
    train_images: int = Field(64, gt=0)
    val_images: int = Field(32, gt=0)
    image_size: int = Field(128, ge=32)
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
    min_size: int | None = Field(None, gt=0)  # resize shorter side (null: the model's default, 800 for R-CNNs)
    max_size: int | None = Field(None, gt=0)
    width: int = Field(32, ge=4)  # fasterrcnn_tiny only
    sync_bn: bool = False  # SyncBatchNorm across ranks
    kwargs: dict[str, Any] = {}  # more keyword arguments for the torchvision builder


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"  # auto: faster-coco-eval if installed
    batch_size: int | None = Field(None, gt=0)  # null: training.batch_size
    every_epochs: int = Field(1, gt=0)  # the last epoch is always evaluated


class DetectionConfig(ExperimentConfig):
    output_dir: str = "runs/detection"
    data: DetectionData = DetectionData()
    model: DetectionModel = DetectionModel()
    eval: EvalConfig = EvalConfig()


# ----------------------------------------------------------------------------------------------
# Data


def resolve_splits(cfg: DetectionConfig, run_dir: Path) -> tuple[Any, Any]:
    """``CocoPaths`` of the train and val splits: under ``data.root``, or the synthetic default written
    into the run folder (by the main rank first)."""
    d = cfg.data
    root = d.root
    if root is None:
        root = str(run_dir / "data")
        layout = "coco" if d.layout == "auto" else d.layout
        with main_process_first():
            for split, n in ((d.train_split, d.synthetic.train_images), (d.val_split, d.synthetic.val_images)):
                try:
                    resolve_coco(root, split, layout=layout)
                except CocoPathError:
                    ratlib.synthetic.make_coco_detection(
                        root,
                        split,
                        num_images=n,
                        layout=layout,
                        seed=d.synthetic.seed,
                        image_size=d.synthetic.image_size,
                    )
                    log.info("wrote a synthetic COCO %s split (%d images) under %s", split, n, root)
    out = []
    for key, split in (("train_split", d.train_split), ("val_split", d.val_split)):
        try:
            out.append(resolve_coco(root, split, layout=d.layout))
        except CocoPathError:
            raise
        except ValueError as exc:  # a split name coco_paths does not know
            raise UsageError(f"data.{key}={split!r}: {exc}") from None
    return out[0], out[1]


def build_datasets(cfg: DetectionConfig, run_dir: Path, masks: bool) -> tuple[du.CocoDetection, du.CocoDetection]:
    train_paths, val_paths = resolve_splits(cfg, run_dir)
    log.info("data: train %s, val %s (%s layout)", train_paths.annotations, val_paths.annotations, train_paths.layout)
    train_set = du.CocoDetection(
        train_paths.images,
        train_paths.annotations,
        train=True,
        limit=cfg.data.limit,
        keep_empty=cfg.data.keep_empty,
        masks=masks,
        transforms=du.make_transforms(True),
        name=str(train_paths.split),
    )
    val_set = du.CocoDetection(
        val_paths.images,
        val_paths.annotations,
        train=False,
        limit=cfg.data.limit,
        transforms=du.make_transforms(False),
        name=str(val_paths.split),
    )
    if val_set.label_to_cat != train_set.label_to_cat:
        raise UsageError(
            f"the categories differ between {train_paths.annotations} ({train_set.label_to_cat[1:]}) "
            f"and {val_paths.annotations} ({val_set.label_to_cat[1:]}); both splits need the same list"
        )
    return train_set, val_set


def eval_loader(cfg: DetectionConfig, val_set: du.CocoDetection, info: DistInfo) -> torch.utils.data.DataLoader:
    """This rank's shard of the validation set, each image on exactly one rank (no padding)."""
    shard = torch.utils.data.Subset(val_set, du.eval_shard(len(val_set), info.rank, info.world_size))
    return torch.utils.data.DataLoader(
        shard,
        batch_size=cfg.eval.batch_size or cfg.training.batch_size,
        num_workers=cfg.data.num_workers,
        collate_fn=du.collate,
        pin_memory=info.device.type == "cuda",
    )


# ----------------------------------------------------------------------------------------------
# Model


def model_names() -> list[str]:
    """The detection models this example builds: torchvision's (not keypoint R-CNN or SSD, which need
    other targets or fixed sizes) and ``fasterrcnn_tiny``."""
    import torchvision

    return sorted(
        [
            n
            for n in torchvision.models.list_models(module=torchvision.models.detection)
            if not n.startswith(("keypointrcnn", "ssd"))
        ]
        + ["fasterrcnn_tiny"]
    )


def check_model_name(name: str) -> None:
    if name not in model_names():
        import difflib

        close = difflib.get_close_matches(name, model_names(), n=3)
        raise UsageError(
            f"model.name={name!r} is not a detection model this example builds; expected one of "
            f"{', '.join(model_names())}" + (f" (closest: {', '.join(close)})" if close else "")
        )


def build_model(m: DetectionModel, num_classes: int) -> nn.Module:
    """A torchvision detection model by name with ``num_classes`` (background included). No download
    unless ``backbone_weights`` names torchvision weights; local files load with a report."""
    import torchvision

    check_model_name(m.name)
    kwargs = dict(m.kwargs)
    if m.min_size is not None:
        kwargs["min_size"] = m.min_size
    if m.max_size is not None:
        kwargs["max_size"] = m.max_size
    if m.name == "fasterrcnn_tiny":
        model = du.fasterrcnn_tiny(num_classes, width=m.width, **kwargs)
    else:
        backbone = None
        if m.backbone_weights is not None and not _is_path(m.backbone_weights):
            backbone = m.backbone_weights  # a torchvision weights name: torchvision downloads or reads its cache
        model = torchvision.models.get_model(
            m.name, weights=None, weights_backbone=backbone, num_classes=num_classes, **kwargs
        )
        if m.backbone_weights is not None and backbone is None:
            _load_local(model.backbone.body, m.backbone_weights, "model.backbone_weights")
    if m.weights is not None:
        _load_local(model, m.weights, "model.weights")
    return model


def _is_path(value: str) -> bool:
    return (
        "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(value).exists()
    )


def _load_local(module: nn.Module, path: str, key: str) -> None:
    """Load a local state_dict (or a checkpoint holding one under "model") into ``module``: keys are
    matched with common prefixes removed, tensors of another shape (a class head) are skipped, logged."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{key}={path!r}: no such file; give a local .pt/.pth state_dict (no download happens)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    own = module.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in ("", "module.", "features.", "backbone.body.", "backbone."):
        cand = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
        if len(cand) > len(best):
            best = cand
    fits = {k: v for k, v in best.items() if v.shape == own[k].shape}
    skipped = sorted(set(best) - set(fits))
    if not fits:
        raise UsageError(
            f"{key}={path!r}: none of its {len(state)} tensors match the model's names; is it a "
            f"state_dict for this architecture? (e.g. its keys: {list(state)[:3]})"
        )
    module.load_state_dict(fits, strict=False)
    log.info(
        "%s: loaded %d of %d tensors from %s%s",
        key,
        len(fits),
        len(own),
        file,
        f"; skipped {len(skipped)} with another shape: {skipped[:4]}" if skipped else "",
    )


def lr_lambda(step: int, cfg: DetectionConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Learning-rate factor at optimiser step ``step``: linear warmup, then cosine to min_lr, step decay
    every ``step_size`` epochs, or constant."""
    s, lr = cfg.training.scheduler, cfg.training.optimizer.lr
    warmup = s.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if s.name == "step":
        return s.gamma ** ((step // steps_per_epoch) // s.step_size)
    if s.name == "cosine":
        t = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
        return s.min_lr / lr + (1 - s.min_lr / lr) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def make_optimizer(cfg: DetectionConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.training.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=device.type == "cuda")


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them at the
    start of each forward, so after the last step every rank holds its own; evaluation on the shards
    must use the weights the checkpoint holds."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------------------------
# Checkpoints and metrics


def save_checkpoint(run_dir: Path, state: dict[str, Any], info: DistInfo) -> None:
    """checkpoints/epoch{E}.pt, written by rank 0 atomically (ratlib.checkpoint.save); all ranks wait."""
    checkpoint.save(state, run_dir / "checkpoints" / f"epoch{state['epoch']:04d}.pt")


def latest_checkpoint(run_dir: Path) -> Path | None:
    return checkpoint.latest(run_dir / "checkpoints", "epoch*.pt")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Every rank reads the checkpoint onto the CPU."""
    try:
        return checkpoint.load(path, map_location="cpu")
    except checkpoint.CheckpointError as exc:
        raise UsageError(str(exc)) from exc


def write_metrics(run_dir: Path, record: dict[str, Any], info: DistInfo) -> None:
    """One JSON line per epoch in metrics.jsonl, by the main rank."""
    if info.is_main:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a row that was logged survives a crash right after


# ----------------------------------------------------------------------------------------------
# Training


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Any,
    device: torch.device,
    cfg: DetectionConfig,
    *,
    epoch: int,
    step: int,
    max_steps: int | None,
    autocast: Callable[[], Any],
    scaler: Any = None,
    engine: Any = None,
) -> tuple[int, dict[str, float], list[int]]:
    """One pass over this rank's batches; returns the optimiser step reached, this rank's mean losses and
    the image ids it trained on. Stops early at ``max_steps``."""
    t = cfg.training
    accum = t.gradient_accumulation_steps
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    model.train()
    sums: dict[str, torch.Tensor] = {}
    image_ids: list[int] = []
    done = 0
    batches = len(loader)
    start = time.perf_counter()
    for i, (images, targets) in enumerate(progress(loader, desc=f"epoch {epoch}", leave=False)):
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [
            {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in tg.items()}
            for tg in targets
        ]
        image_ids += [tg["image_id"] for tg in targets]
        boundary = (i + 1) % accum == 0 or i + 1 == batches
        no_sync = model.no_sync() if ddp and not boundary else contextlib.nullcontext()
        with no_sync:
            with autocast():
                loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
            if engine is not None:
                engine.backward(loss)
            elif scaler is not None:
                scaler.scale(loss / accum).backward()
            else:
                (loss / accum).backward()
        for k, v in (("loss", loss), *loss_dict.items()):
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        done += 1
        if engine is not None:
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()  # DeepSpeed clips, steps and schedules at its own accumulation boundary
            if not boundary:
                continue
        else:
            if not boundary:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            if t.gradient_clip:
                nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        step += 1
        heartbeat(step)  # for distributed.stall_timeout_s (ratlib.hang): nearly free
        if step % t.log_every == 0 or step == max_steps:
            value = loss.item()  # a device sync, only every log_every steps
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"epoch {epoch}, step {step}: the loss is {value} "
                    f"({ {k: v.item() for k, v in loss_dict.items()} }); "
                    f"lower training.optimizer.lr (now {t.optimizer.lr}), keep training.gradient_clip on, or add "
                    "training.scheduler.warmup_epochs"
                )
            log.info(
                "epoch %d step %d: loss %.4f lr %.3g (%.2f s/step)",
                epoch,
                step,
                value,
                optimizer.param_groups[0]["lr"],
                (time.perf_counter() - start) / (i + 1) * accum,
            )
        if max_steps is not None and step >= max_steps:
            break
    return step, {k: float(v) / max(1, done) for k, v in sums.items()}, image_ids


def autocast_for(cfg: DetectionConfig, device: torch.device) -> Callable[[], Any]:
    """bf16 (or fp16) autocast on CUDA when ``training.mixed_precision``; nothing on CPU."""
    mp = cfg.training.mixed_precision
    dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, "cuda", dtype=dtype)


def train(
    cfg: DetectionConfig, *, run_dir: str | Path | None = None, resume: bool = False, info: DistInfo | None = None
) -> dict[str, float]:
    """Train and evaluate on an already-initialised process group (or a single process); returns the
    final validation metrics (``map``, ``map50``, ... as ``du.STAT_NAMES``) on every rank.

    ``info``: the ``DistInfo`` from the caller's ``distributed()``; by default ``init_distributed()``
    (idempotent) gives it. ``resume``: continue from the latest checkpoint under ``run_dir``.
    """
    info = info or ratlib.init_distributed()
    device, t = info.device, cfg.training
    check_model_name(cfg.model.name)  # before the data is read
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    for finding in check_config(cfg, info.world_size, device=device.type):
        if finding.severity != "info" and not finding.key.startswith("data."):  # resolve_coco reports data paths
            log.warning("config %s: %s. %s", finding.key, finding.message, finding.advice)
    torch.manual_seed(t.seed)

    # Data: each rank trains on its share of every epoch's images and predicts on its shard of val.
    masks = cfg.model.name.startswith("maskrcnn")
    train_set, val_set = build_datasets(cfg, run_dir, masks)
    sampler = du.ShardedBatchSampler(
        train_set.aspect_groups(), t.batch_size, rank=info.rank, world_size=info.world_size, seed=t.seed
    )
    cuda = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=du.collate,
        pin_memory=cuda,
        persistent_workers=cfg.data.num_workers > 0,
    )
    val_loader = eval_loader(cfg, val_set, info)
    steps_per_epoch = math.ceil(len(sampler) / t.gradient_accumulation_steps)
    total_steps = (
        steps_per_epoch * t.num_epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.num_epochs)
    )

    # Model, precision, optimizer, schedule; DDP or DeepSpeed.
    model = build_model(cfg.model, train_set.num_classes).to(device)
    if cfg.model.sync_bn and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last if t.channels_last is not None else cuda:
        model = model.to(memory_format=torch.channels_last)
    if t.compile:
        model.backbone.compile()  # in place: state_dict keys stay the same
    autocast = autocast_for(cfg, device)
    amp = autocast.keywords["dtype"] if isinstance(autocast, partial) else None
    if t.mixed_precision and not cuda:
        log.info("training.mixed_precision=%s is off on %s (autocast on CPU is slow)", t.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and not t.deepspeed.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "model %s: %.2fM parameters (%.2fM trainable), %d classes; %d ranks x batch %d x accumulation %d = "
        "global batch %d; %d optimiser steps per epoch, %d in all; device %s%s",
        cfg.model.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in params) / 1e6,
        train_set.num_classes - 1,
        info.world_size,
        t.batch_size,
        t.gradient_accumulation_steps,
        info.world_size * t.batch_size * t.gradient_accumulation_steps,
        steps_per_epoch,
        total_steps,
        device,
        f", {amp}" if amp else "",
    )
    engine = None
    if t.deepspeed.enabled:
        try:
            import deepspeed
        except ImportError:
            raise UsageError(
                "training.deepspeed.enabled=true, but DeepSpeed is not installed: pip install "
                "'ratlib[deepspeed]' (needs CUDA and a compiler), or set training.deepspeed.enabled=false"
            ) from None
        ds_config = to_deepspeed_config(cfg, info.world_size, steps_per_epoch=steps_per_epoch, device=device.type)
        scheduler_fn = (
            None
            if "scheduler" in ds_config
            else (
                lambda opt: torch.optim.lr_scheduler.LambdaLR(
                    opt, partial(lr_lambda, cfg=cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
                )
            )
        )
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config, lr_scheduler=scheduler_fn
        )
        train_model, eval_model = engine, engine.module
    else:
        optimizer = make_optimizer(cfg, params, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_lambda, cfg=cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        )
        train_model = model
        if info.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
        eval_model = model  # unwrapped: DDP's forward would broadcast buffers and needs every rank in step

    # Resume: weights, optimizer, schedule and counters from the latest checkpoint.
    start_epoch, step = 0, 0
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            log.warning("--resume: no checkpoint under %s; starting from scratch", run_dir / "checkpoints")
        else:
            state = load_checkpoint(path)
            model.load_state_dict(state["model"])
            if engine is None:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
            else:  # the engine's own checkpoint holds its (possibly partitioned) optimizer and schedule
                tag = f"epoch{state['epoch']:04d}"
                loaded, _ = engine.load_checkpoint(str(run_dir / "checkpoints" / "deepspeed"), tag=tag)
                if loaded is None:
                    raise UsageError(
                        f"--resume: {path} has no DeepSpeed checkpoint {tag} beside it under "
                        f"{run_dir / 'checkpoints' / 'deepspeed'}; resume with the same "
                        "training.deepspeed.enabled as the run that wrote it"
                    )
            start_epoch, step = state["epoch"] + 1, state["step"]
            if state.get("rng"):
                checkpoint.set_rng_state(state["rng"])
            log.info("resumed from %s: epoch %d done, step %d", path, state["epoch"], step)

    def run_eval() -> dict[str, float]:
        metrics = du.evaluate(
            eval_model, val_loader, val_set, device, is_main=info.is_main, autocast=autocast, backend=cfg.eval.backend
        )
        return broadcast_object(metrics)

    metrics: dict[str, float] = {}
    last_epoch = t.num_epochs - 1
    for epoch in range(start_epoch, t.num_epochs):
        if t.max_steps is not None and step >= t.max_steps:
            break
        sampler.set_epoch(epoch)
        memory.reset_peak_memory(device)  # per-epoch peaks, on every rank
        epoch_start = time.perf_counter()
        step, losses, seen = train_one_epoch(
            train_model,
            optimizer,
            scheduler,
            train_loader,
            device,
            cfg,
            epoch=epoch,
            step=step,
            max_steps=t.max_steps,
            autocast=autocast,
            scaler=scaler,
            engine=engine,
        )
        train_time = time.perf_counter() - epoch_start
        sync_buffers(model)
        losses = reduce_dict(losses)  # mean over ranks
        seen_by_rank = gather_object(seen)
        stopping = epoch == last_epoch or (t.max_steps is not None and step >= t.max_steps)
        metrics = run_eval() if stopping or (epoch + 1) % cfg.eval.every_epochs == 0 else {}

        mem = memory.memory_report(device, warn_fraction=t.memory_warning_fraction)  # every rank's peak, gathered
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in losses.items()},
            **metrics,
            **mem.to_metrics(),
        }
        if info.is_main:
            assert seen_by_rank is not None
            images = [i for rank_ids in seen_by_rank for i in rank_ids]
            record.update(
                train_images=len(images),
                train_unique_images=len(set(images)),
                train_time_s=train_time,
                images_per_s=len(images) / train_time,
            )
            log.info(
                "epoch %d done: step %d, loss %.4f, map %s, map50 %s, %d images (%d unique) at %.1f images/s",
                epoch,
                step,
                record["train_loss"],
                *(f"{metrics[k]:.4f}" if metrics else "-" for k in ("map", "map50")),
                len(images),
                len(set(images)),
                record["images_per_s"],
            )
        write_metrics(run_dir, record, info)
        if engine is not None:
            engine.save_checkpoint(
                str(run_dir / "checkpoints" / "deepspeed"),
                tag=f"epoch{epoch:04d}",
                client_state={"epoch": epoch, "step": step},
            )
        save_checkpoint(
            run_dir,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if engine is None else None,
                "scheduler": scheduler.state_dict() if engine is None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "step": step,
                "metrics": metrics,
                "rng": checkpoint.rng_state(),
                "config": cfg.model_dump(mode="json"),
            },
            info,
        )
        if stopping:
            break
    if not metrics:  # nothing left to train (a finished run resumed): evaluate what was loaded
        metrics = run_eval()
    return metrics


def evaluate_checkpoint(
    cfg: DetectionConfig,
    checkpoint: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """``--eval-only``: COCO evaluation of a checkpoint (default: the run folder's latest) on the val split;
    the figures also go to ``run_dir/eval.json``."""
    info = info or ratlib.init_distributed()
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None or not path.is_file():
        raise UsageError(
            f"--eval-only: checkpoint {str(path) if path else run_dir / 'checkpoints/epoch*.pt'} not "
            "found; pass --checkpoint PATH or the output_dir of a finished run"
        )
    _, val_set = build_datasets(cfg, run_dir, masks=False)
    model = build_model(cfg.model, val_set.num_classes).to(info.device)
    model.load_state_dict(load_checkpoint(path)["model"])
    log.info("evaluating %s", path)
    metrics = du.evaluate(
        model,
        eval_loader(cfg, val_set, info),
        val_set,
        info.device,
        is_main=info.is_main,
        autocast=autocast_for(cfg, info.device),
        backend=cfg.eval.backend,
    )
    if info.is_main:
        (run_dir / "eval.json").write_text(json.dumps({"checkpoint": str(path), **metrics}, indent=1) + "\n")
    return broadcast_object(metrics)


# What the ablation runner (examples/ablation/run.py) reads from an example.
CONFIG_SCHEMA = DetectionConfig
MAIN_METRIC = "map"
METRIC_MODE = "max"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (default: all defaults)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate a checkpoint")
    parser.add_argument("--checkpoint", help="with --eval-only: the checkpoint (default: the latest in output_dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.batch_size=4")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, overrides=args.overrides, schema=DetectionConfig)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    run_dir = Path(cfg.output_dir)
    setup_logging(log_dir=run_dir / "logs")
    d = cfg.distributed
    with distributed(
        d.backend, timeout=d.timeout_s, connect_timeout=d.connect_timeout_s, stall_timeout=d.stall_timeout_s
    ) as info:
        try:
            if args.eval_only:
                metrics = evaluate_checkpoint(cfg, args.checkpoint, run_dir=run_dir, info=info)
            else:
                metrics = train(cfg, run_dir=run_dir, resume=args.resume, info=info)
        except (CocoPathError, UsageError) as exc:  # the user's input: the message, not a traceback
            log.error("%s", exc)
            return 2
    log.info("final: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

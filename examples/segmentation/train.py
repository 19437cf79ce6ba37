"""Medical image segmentation (Medical Segmentation Decathlon, 2D UNet) on one CPU or many GPUs.

    python examples/segmentation/train.py --config examples/segmentation/config.yaml
    torchrun --nproc_per_node 8 examples/segmentation/train.py --config examples/segmentation/config.yaml \
        data.root=/data/Task09_Spleen data.normalize=window
    python examples/segmentation/train.py --config ... --resume       # continue from the latest checkpoint
    python examples/segmentation/train.py --config ... --eval-only [--checkpoint PATH]

With no ``data.root`` it writes a small synthetic Decathlon task (blob-shaped organs in NIfTI volumes)
into the run folder and trains on it. Everything lands under ``output_dir``: config.yaml (resolved),
logs/rank{R}.log, metrics.jsonl (one row per epoch), checkpoints/, cache/ (preprocessed volumes). Read it
top to bottom: config, data, model, loop, evaluation, checkpoint, train(), main(). ``train(cfg)`` is
importable (the ablation runner calls it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
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
import ratlib.checkpoint
import ratlib.memory
from ratlib import (
    CheckpointError,
    ConfigError,
    DataConfig,
    DistInfo,
    ExperimentConfig,
    ModelConfig,
    all_gather_object,
    broadcast_object,
    check_config,
    distributed,
    dump_config,
    get_logger,
    load_config,
    main_process_first,
    progress,
    reduce_dict,
    setup_logging,
    to_deepspeed_config,
)
from ratlib.hang import heartbeat

sys.path.insert(0, str(Path(__file__).resolve().parent))  # seg_utils.py sits beside this file
import seg_utils as su  # noqa: E402

log = get_logger("segmentation")


class UsageError(ValueError):
    """A problem with the user's input (config, data, checkpoint): printed without a traceback."""


# ----------------------------------------------------------------------------------------------
# Config: ratlib's ExperimentConfig (training, distributed, ...) plus this example's data, model, eval


class SyntheticData(BaseModel):
    """The embedded default task, written into the run folder when ``data.root`` is null."""

    model_config = ConfigDict(extra="forbid")
    num_cases: int = Field(8, ge=2)
    shape: tuple[int, int, int] = (64, 64, 16)  # x, y, z (slices)
    num_classes: int = Field(3, ge=2, le=8)  # background included: 3 = two organs
    seed: int = 0


class SegmentationData(DataConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    val_fraction: float = Field(0.25, gt=0, lt=1)  # share of the cases for validation (at least one)
    split_seed: int = 0  # the train/val split; the same on every rank and run
    normalize: Literal["zscore", "window"] = "zscore"  # window: clip to data.window (CT), scale to [-1, 1]
    window: tuple[float, float] = (-175.0, 250.0)  # Hounsfield units, an abdominal window
    patch_size: tuple[int, int] | None = None  # random training crops; null: whole slices
    flip: bool = True  # random flips along both in-plane axes
    empty_slices: float = Field(1.0, ge=0, le=1)  # share of training slices without foreground kept
    cache_dir: str | None = None  # preprocessed volumes; null: run folder/cache
    synthetic: SyntheticData = SyntheticData()


class SegmentationModel(ModelConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    feature_dims: int | list[int] = 16  # channels of the first level (doubling per level), or one per level
    num_blocks: int = Field(4, ge=1, le=8)  # levels, the bottleneck included: 4 = 3 poolings
    norm: Literal["batch", "instance", "group"] = "batch"


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int | None = Field(None, gt=0)  # null: training.batch_size
    every_epochs: int = Field(1, gt=0)  # the last epoch is always evaluated


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: int | None = Field(3, gt=0)  # newest checkpoints kept; null: all


class SegmentationConfig(ExperimentConfig):
    output_dir: str = "runs/segmentation"
    data: SegmentationData = SegmentationData()
    model: SegmentationModel = SegmentationModel()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()


CONFIG_SCHEMA = SegmentationConfig
MAIN_METRIC = "dice"  # mean Dice over the foreground classes, on the validation cases
METRIC_MODE = "max"


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
# Data


def resolve_task(cfg: SegmentationConfig, run_dir: Path) -> su.Task:
    """The task under ``data.root``, or the synthetic default written into the run folder (by the main
    rank first; rewritten when the synthetic settings changed)."""
    root = cfg.data.root
    if root is None:
        root = run_dir / "data"
        s = cfg.data.synthetic
        wanted = {"num_cases": s.num_cases, "shape": list(s.shape), "num_classes": s.num_classes, "seed": s.seed}
        with main_process_first():
            try:
                have = json.loads((root / "dataset.json").read_text())["generator_args"]
            except (OSError, ValueError, KeyError, TypeError):
                have = {}
            if {k: have.get(k) for k in wanted} != wanted:
                ratlib.synthetic.make_msd_segmentation(root, s.num_cases, s.shape, s.num_classes, s.seed)
                log.info(
                    "wrote a synthetic Decathlon task (%d cases of %s, %d classes) under %s",
                    s.num_cases,
                    "x".join(map(str, s.shape)),
                    s.num_classes,
                    root,
                )
    return su.read_task(root)


def build_datasets(cfg: SegmentationConfig, run_dir: Path) -> tuple[su.Task, su.SliceDataset, su.SliceDataset]:
    """Split the task's cases, preprocess them into the cache (main rank first), and return the train and
    validation slice datasets."""
    d = cfg.data
    task = resolve_task(cfg, run_dir)
    train_cases, val_cases = su.split_cases(task.cases, d.val_fraction, d.split_seed)
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else run_dir / "cache"

    def prep(case: su.Case) -> tuple[Path, Path]:
        return su.preprocess(case, cache, task.num_classes, len(task.modalities), d.normalize, d.window)

    with main_process_first():  # rank 0 writes the cache, the others then read it
        train_set, train_read = limited_dataset(
            train_cases,
            prep,
            d.limit,
            partial(
                su.SliceDataset,
                train=True,
                limit=d.limit,
                patch_size=d.patch_size,
                flip=d.flip,
                empty_slices=d.empty_slices,
                seed=d.split_seed,
            ),
        )
        val_set, val_read = limited_dataset(
            val_cases, prep, d.limit, partial(su.SliceDataset, train=False, limit=d.limit)
        )
    read = f" (data.limit={d.limit}: {train_read} and {val_read} cases read)" if d.limit is not None else ""
    log.info(
        "task %s (%s): %d classes (%s), %d modalities; %d train cases -> %d slices, %d val cases -> %d slices%s",
        task.name,
        task.root,
        task.num_classes,
        ", ".join(task.class_names),
        len(task.modalities),
        len(train_cases),
        len(train_set),
        len(val_cases),
        len(val_set),
        read,
    )
    return task, train_set, val_set


def limited_dataset(
    cases: list[su.Case],
    prep: Callable[[su.Case], tuple[Path, Path]],
    limit: int | None,
    make: Callable[[list[tuple[Path, Path]]], su.SliceDataset],
) -> tuple[su.SliceDataset, int]:
    """Preprocess a split's cases in order and build its dataset; returns it and the number of cases read.
    With ``data.limit`` the cases after the first ``limit`` slices are never read or preprocessed: a smoke
    run on a real task costs a volume or two, not the whole task. The slices are the same as with every case
    read (``SliceDataset`` picks them volume by volume, in order)."""
    volumes: list[tuple[Path, Path]] = []
    raw = 0  # slices in the volumes read so far, before empty slices are dropped
    for case in cases:
        volumes.append(prep(case))
        raw += int(np.load(volumes[-1][1], mmap_mode="r").shape[0])
        if limit is not None and raw >= limit and len(volumes) < len(cases):
            try:
                dataset = make(volumes)
            except su.TaskError:  # every slice read so far dropped as empty: read on
                continue
            if len(dataset) >= limit:
                return dataset, len(volumes)
    return make(volumes), len(volumes)


def eval_loader(
    cfg: SegmentationConfig, val_set: su.SliceDataset, info: DistInfo, multiple: int
) -> torch.utils.data.DataLoader:
    """This rank's part of the validation slices (DistributedSampler, no shuffling: the repeats it pads
    with are left out of the metric by ``su.eval_positions``)."""
    sampler = torch.utils.data.DistributedSampler(val_set, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    return torch.utils.data.DataLoader(
        val_set,
        batch_size=cfg.eval.batch_size or cfg.training.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=partial(su.pad_collate, multiple=multiple),
        pin_memory=info.device.type == "cuda",
    )


# ----------------------------------------------------------------------------------------------
# Model, optimiser, schedule, precision


def build_model(cfg: SegmentationConfig, in_channels: int, num_classes: int) -> su.UNet:
    m = cfg.model
    return su.UNet(in_channels, num_classes, su.widths(m.feature_dims, m.num_blocks), norm=m.norm)


def lr_lambda(step: int, cfg: SegmentationConfig, steps_per_epoch: int, total_steps: int) -> float:
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


def make_optimizer(cfg: SegmentationConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.training.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=device.type == "cuda")


def autocast_for(cfg: SegmentationConfig, device: torch.device) -> Callable[[], Any]:
    """bf16 (or fp16) autocast on CUDA when ``training.mixed_precision``; nothing on CPU."""
    dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.mixed_precision)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, "cuda", dtype=dtype)


def channels_last(cfg: SegmentationConfig, device: torch.device) -> bool:
    return cfg.training.channels_last if cfg.training.channels_last is not None else device.type == "cuda"


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, with model.norm=batch) to every rank before
    evaluating: after the last step each rank holds its own, and the checkpoint holds rank 0's."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def train_one_epoch(
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    device: torch.device,
    cfg: SegmentationConfig,
    *,
    epoch: int,
    step: int,
    max_steps: int | None,
    autocast: Callable[[], Any],
    scaler: Any = None,
    engine: Any = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[int, float, list[int]]:
    """One pass over this rank's batches; returns the optimiser step reached, this rank's mean loss and
    the slice indices it trained on. Stops early at ``max_steps``. The loss stays on the device (one
    ``.item()`` every ``log_every`` steps)."""
    t = cfg.training
    accum = t.gradient_accumulation_steps
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen: list[torch.Tensor] = []
    done = 0
    batches = len(loader)
    start = time.perf_counter()
    for i, (images, labels, index) in enumerate(progress(loader, desc=f"epoch {epoch}", leave=False)):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        seen.append(index)
        boundary = (i + 1) % accum == 0 or i + 1 == batches
        no_sync = model.no_sync() if ddp and not boundary else contextlib.nullcontext()
        with no_sync:
            with autocast():
                logits = model(images)
            loss = su.dice_ce_loss(logits, labels)
            if engine is not None:
                engine.backward(loss)
            elif scaler is not None:
                scaler.scale(loss / accum).backward()
            else:
                (loss / accum).backward()
        loss_sum += loss.detach()
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
                    f"epoch {epoch}, step {step}: the loss is {value}; lower training.optimizer.lr (now "
                    f"{t.optimizer.lr}), keep training.gradient_clip on, or add training.scheduler.warmup_epochs"
                )
            log.info(
                "epoch %d step %d: loss %.4f lr %.3g (%.3f s/step)",
                epoch,
                step,
                value,
                optimizer.param_groups[0]["lr"],
                (time.perf_counter() - start) / (i + 1) * accum,
            )
        if max_steps is not None and step >= max_steps:
            break
    indices = torch.cat(seen).tolist() if seen else []
    return step, float(loss_sum) / max(1, done), indices


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    info: DistInfo,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Dice per class over all validation slices of all ranks, the same on every rank.

    Each rank counts pixels into a confusion matrix (int64) over its real samples only (the sampler's
    padding repeats are left out); the matrices are summed over ranks and Dice is computed once from the
    sums: the figure a single process gets on the whole set, not an average of per-rank Dice.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    num_samples = len(loader.dataset)
    real = torch.from_numpy(su.eval_positions(num_samples, len(loader.sampler), info.rank, info.world_size))
    conf: torch.Tensor | None = None
    pos, counted, indices = 0, 0, []
    for images, labels, index in loader:
        keep = real[pos : pos + len(labels)]
        pos += len(labels)
        with autocast():
            logits = model(images.to(device, non_blocking=True, memory_format=memory_format))
        c = su.confusion(logits, labels.to(device, non_blocking=True), keep.to(device))
        conf = c if conf is None else conf + c
        counted += int(keep.sum())
        indices += index[keep].tolist()
    model.train(was_training)
    if conf is None:  # a rank without validation samples (fewer slices than ranks)
        conf = torch.zeros((0, 0), dtype=torch.int64)
    gathered = all_gather_object((conf.cpu().numpy(), counted, indices))
    total = sum(g[0] for g in gathered if g[0].size)
    all_indices = [i for g in gathered for i in g[2]]
    metrics = su.dice_scores(total)
    metrics.update(
        val_samples=sum(g[1] for g in gathered),
        val_unique_samples=len(set(all_indices)),
        val_time_s=time.perf_counter() - start,
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints and metrics


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int | None) -> Path:
    """checkpoints/epoch{E}.pt, written atomically by the main rank (ratlib.checkpoint.save); all ranks
    call it and wait."""
    return ratlib.checkpoint.save(state, checkpoint_dir(run_dir) / f"epoch{state['epoch']:04d}.pt", keep=keep)


def latest_checkpoint(run_dir: Path) -> Path | None:
    return ratlib.checkpoint.latest(checkpoint_dir(run_dir), "epoch*.pt")


def write_metrics(run_dir: Path, record: dict[str, Any], info: DistInfo) -> None:
    """One JSON line per epoch in metrics.jsonl, by the main rank."""
    if info.is_main:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def trim_metrics(run_dir: Path, last_epoch: int, info: DistInfo) -> None:
    """On resume: drop the metrics.jsonl rows of epochs after the checkpoint (work that was lost when the
    run died), so that the file reads as one run."""
    path = run_dir / "metrics.jsonl"
    if not info.is_main or not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) <= last_epoch]
    if len(kept) != len(lines):
        log.info(
            "--resume: dropped %d metrics.jsonl row(s) after epoch %d (not in the checkpoint)",
            len(lines) - len(kept),
            last_epoch,
        )
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)


def prune_deepspeed(run_dir: Path, keep: int | None, info: DistInfo) -> None:
    """Keep DeepSpeed's tag folders in step with checkpoint.keep (DeepSpeed never deletes them)."""
    folder = checkpoint_dir(run_dir) / "deepspeed"
    if keep is None or not info.is_main or not folder.is_dir():
        return
    for old in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("epoch"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# train(): the whole run


def train(
    cfg: SegmentationConfig, *, run_dir: str | Path | None = None, resume: bool = False, info: DistInfo | None = None
) -> dict[str, float]:
    """Train and validate on an already initialised process group (or a single process); returns the
    final validation metrics (``dice``, ``dice_1``, ...) on every rank.

    ``info``: the ``DistInfo`` from the caller's ``distributed()``; by default ``init_distributed()``
    (idempotent) gives it. ``resume``: continue from the latest checkpoint under ``run_dir``.
    """
    check_settings(cfg)
    info = info or ratlib.init_distributed()
    device, t = info.device, cfg.training
    cuda = device.type == "cuda"
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    for finding in check_config(cfg, info.world_size, device=device.type):
        if finding.severity != "info" and not finding.key.startswith("data."):  # read_task reports data paths
            log.warning("config %s: %s. %s", finding.key, finding.message, finding.advice)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    # Data: every training slice once per epoch across ranks; validation slices each counted once.
    task, train_set, val_set = build_datasets(cfg, run_dir)
    model = build_model(cfg, train_set.in_channels, task.num_classes).to(device)
    sampler = su.ShardedBatchSampler(
        len(train_set), t.batch_size, rank=info.rank, world_size=info.world_size, seed=t.seed
    )
    collate = partial(su.pad_collate, multiple=model.multiple)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=cuda,
        persistent_workers=cfg.data.num_workers > 0,
    )
    val_loader = eval_loader(cfg, val_set, info, model.multiple)
    steps_per_epoch = math.ceil(len(sampler) / t.gradient_accumulation_steps)
    total_steps = (
        steps_per_epoch * t.num_epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.num_epochs)
    )

    # Model, precision, optimiser, schedule; DDP or DeepSpeed.
    memory_format = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if t.compile:
        model.compile()  # in place: state_dict keys stay the same
    autocast = autocast_for(cfg, device)
    amp = autocast.keywords["dtype"] if isinstance(autocast, partial) else None
    if t.mixed_precision and not cuda:
        log.info("training.mixed_precision=%s is off on %s (autocast on CPU is slow)", t.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and not t.deepspeed.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "UNet %s, %s norm: %.2fM parameters; %d ranks x batch %d x accumulation %d = global batch %d; %d "
        "optimiser steps per epoch, %d in all; device %s%s%s",
        su.widths(cfg.model.feature_dims, cfg.model.num_blocks),
        cfg.model.norm,
        sum(p.numel() for p in params) / 1e6,
        info.world_size,
        t.batch_size,
        t.gradient_accumulation_steps,
        info.world_size * t.batch_size * t.gradient_accumulation_steps,
        steps_per_epoch,
        total_steps,
        device,
        f", {amp}" if amp else "",
        ", channels_last" if memory_format == torch.channels_last else "",
    )
    engine = None
    if t.deepspeed.enabled:
        try:
            import deepspeed
        except ImportError:
            raise UsageError(
                "training.deepspeed.enabled=true, but DeepSpeed is not installed: pip install "
                "'ratlib[deepspeed]', or set training.deepspeed.enabled=false"
            ) from None
        ds_config = to_deepspeed_config(cfg, info.world_size, steps_per_epoch=steps_per_epoch, device=device.type)
        if not cuda:  # as with autocast: no bf16/fp16 on the CPU
            ds_config["bf16"]["enabled"] = ds_config["fp16"]["enabled"] = False
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
        train_model = engine
    else:
        optimizer = make_optimizer(cfg, params, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_lambda, cfg=cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        )
        train_model = model
        if info.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    eval_model = model  # unwrapped: DDP's forward would broadcast buffers and needs every rank in step

    # Resume: weights, optimiser, schedule, counters and random generators from the latest checkpoint.
    start_epoch, step = 0, 0
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            log.warning("--resume: no checkpoint under %s; starting from scratch", checkpoint_dir(run_dir))
        else:
            state = ratlib.checkpoint.load(path, map_location="cpu")
            if engine is not None:
                tag = f"epoch{state['epoch']:04d}"
                loaded, _ = engine.load_checkpoint(str(checkpoint_dir(run_dir) / "deepspeed"), tag=tag)
                if loaded is None:
                    raise UsageError(
                        f"--resume: {path} has no DeepSpeed state ({checkpoint_dir(run_dir)}/deepspeed/"
                        f"{tag} is missing); resume with training.deepspeed.enabled=false, or start anew"
                    )
            else:
                if state.get("optimizer") is None:
                    raise UsageError(
                        f"--resume: {path} was written by a DeepSpeed run (no optimizer state in it); "
                        "resume with training.deepspeed.enabled=true"
                    )
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
            ratlib.checkpoint.set_rng_state(state["rng"])
            start_epoch, step = state["epoch"] + 1, state["step"]
            trim_metrics(run_dir, state["epoch"], info)
            log.info("resumed from %s: epoch %d done, step %d", path, state["epoch"], step)

    def run_eval() -> dict[str, float]:
        if cfg.model.norm == "batch":
            sync_buffers(model)
        return evaluate(eval_model, val_loader, device, info, autocast=autocast, memory_format=memory_format)

    metrics: dict[str, float] = {}
    last_epoch = t.num_epochs - 1
    for epoch in range(start_epoch, t.num_epochs):
        if t.max_steps is not None and step >= t.max_steps:
            break
        sampler.set_epoch(epoch)
        ratlib.memory.reset_peak_memory(device)
        epoch_start = time.perf_counter()
        step, loss, seen = train_one_epoch(
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
            memory_format=memory_format,
        )
        if cuda:
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - epoch_start
        lr = optimizer.param_groups[0]["lr"]
        loss = reduce_dict({"loss": loss})["loss"]  # mean over ranks
        seen_by_rank = all_gather_object(seen)
        stopping = epoch == last_epoch or (t.max_steps is not None and step >= t.max_steps)
        metrics = run_eval() if stopping or (epoch + 1) % cfg.eval.every_epochs == 0 else {}
        memory = ratlib.memory.memory_report(device, warn_fraction=t.memory_warning_fraction)

        samples = [i for rank_ids in seen_by_rank for i in rank_ids]
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "loss": loss,
            "lr": lr,
            "train_samples": len(samples),
            "train_unique_samples": len(set(samples)),
            "train_time_s": train_time,
            "images_per_s": len(samples) / train_time,
            **metrics,
            **memory.to_metrics(),
        }
        log.info(
            "epoch %d done: step %d, loss %.4f, dice %s (%s), %d slices (%d unique) at %.1f images/s, peak "
            "memory %.2f GiB (rank %d)",
            epoch,
            step,
            loss,
            f"{metrics['dice']:.4f}" if metrics else "-",
            ", ".join(f"{task.class_names[c]} {metrics[f'dice_{c}']:.3f}" for c in range(1, task.num_classes))
            if metrics
            else "-",
            len(samples),
            len(set(samples)),
            record["images_per_s"],
            record["peak_memory_max_gib"],
            record["peak_memory_max_rank"],
        )
        write_metrics(run_dir, record, info)
        state = {
            "model": ratlib.checkpoint.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict() if engine is None else None,
            "scheduler": scheduler.state_dict() if engine is None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "step": step,
            "rng": ratlib.checkpoint.rng_state(),
            "metrics": metrics,
            "config": cfg.model_dump(mode="json"),
        }
        if engine is not None:  # optimiser and schedule (partitioned by ZeRO) in DeepSpeed's own format
            engine.save_checkpoint(
                str(checkpoint_dir(run_dir) / "deepspeed"),
                tag=f"epoch{epoch:04d}",
                client_state={"epoch": epoch, "step": step},
            )
        save_checkpoint(run_dir, state, cfg.checkpoint.keep)
        if engine is not None:
            prune_deepspeed(run_dir, cfg.checkpoint.keep, info)
        if stopping:
            break
    if not metrics:  # nothing left to train (a finished run resumed): evaluate what was loaded
        metrics = run_eval()
    return broadcast_object(metrics)


def evaluate_checkpoint(
    cfg: SegmentationConfig,
    checkpoint: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """``--eval-only``: Dice of a checkpoint (default: the run folder's latest) on the validation cases;
    the figures also go to ``run_dir/eval.json``."""
    check_settings(cfg)
    info = info or ratlib.init_distributed()
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise UsageError(
            f"--eval-only: no checkpoint under {checkpoint_dir(run_dir)}; pass --checkpoint PATH or "
            "the output_dir of a finished run"
        )
    state = ratlib.checkpoint.load(path, map_location="cpu")
    task, _, val_set = build_datasets(cfg, run_dir)
    model = build_model(cfg, val_set.in_channels, task.num_classes).to(info.device)
    model.load_state_dict(state["model"])
    log.info("evaluating %s (epoch %d, step %d)", path, state["epoch"], state["step"])
    metrics = evaluate(
        model,
        eval_loader(cfg, val_set, info, model.multiple),
        info.device,
        info,
        autocast=autocast_for(cfg, info.device),
    )
    if info.is_main:
        (run_dir / "eval.json").write_text(json.dumps({"checkpoint": str(path), **metrics}, indent=1) + "\n")
    return metrics


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
        cfg = load_config(args.config, overrides=args.overrides, schema=SegmentationConfig)
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
        except (su.TaskError, CheckpointError, UsageError) as exc:  # the user's input: the message, no traceback
            log.error("%s", exc)
            return 2
    log.info("final: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

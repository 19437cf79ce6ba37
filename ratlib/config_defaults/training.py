"""What the ``training`` section means at run time: the optimiser, the schedule, autocast, and a ``Stepper``
that turns losses into optimiser steps with gradient accumulation and clipping, around DDP, the bare model
or DeepSpeed's engine. Also ``parse_args``, the command line of a training script.

``make_stepper`` is the one place that builds DeepSpeed's engine (``training.deepspeed.enabled``) and
``Stepper.step`` the one place that steps it, so a training loop does not know which it has::

    stepper = make_stepper(cfg, model, info, steps_per_epoch, total_steps)
    autocast = autocast_for(cfg, info.device)
    for i, batch in enumerate(loader):
        boundary = (i + 1) % cfg.training.gradient_accumulation_steps == 0 or i + 1 == len(loader)
        with stepper.no_sync(boundary):
            with autocast():
                loss = loss_fn(stepper.model(batch))
            stepper.backward(loss)
        stepper.step(boundary)

torch and deepspeed are imported inside the functions (``import ratlib.config_defaults`` stays torch-free).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratlib.config_defaults.checks import check_config
from ratlib.config_defaults.deepspeed import to_deepspeed_config
from ratlib.config_defaults.schema import ExperimentConfig
from ratlib.errors import RatlibError, message
from ratlib.launch import is_main_process
from ratlib.rank_logger import get_logger

if TYPE_CHECKING:
    import argparse

    import torch
    from torch import nn

    from ratlib.data import ShardedBatchSampler
    from ratlib.dist_init import DistInfo

__all__ = [
    "Stepper",
    "UsageError",
    "autocast_for",
    "loss_weight",
    "lr_lambda",
    "make_optimizer",
    "make_scheduler",
    "make_sentinel",
    "make_stepper",
    "memory_format_for",
    "parse_args",
    "report_findings",
    "train_sampler",
]

log = get_logger("ratlib.config_defaults")


class UsageError(RatlibError, ValueError):
    """A problem with the user's input (config, paths, checkpoint): a training script prints the message
    without a traceback."""


def lr_lambda(step: int, cfg: ExperimentConfig, steps_per_epoch: int, total_steps: int) -> float:
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


def make_scheduler(cfg: ExperimentConfig, optimizer: Any, steps_per_epoch: int, total_steps: int) -> Any:
    """``training.scheduler`` as a ``LambdaLR`` over ``optimizer``, stepped once per optimiser step."""
    import torch

    schedule = partial(lr_lambda, cfg=cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def make_optimizer(cfg: ExperimentConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """``training.optimizer``: SGD with momentum, or AdamW/Adam (fused kernels on CUDA)."""
    import torch

    o = cfg.training.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=device.type == "cuda")


def autocast_for(cfg: ExperimentConfig, device: torch.device) -> Callable[[], Any]:
    """bf16 (or fp16) autocast on CUDA when ``training.mixed_precision``; nothing on CPU."""
    import torch

    dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.mixed_precision)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, "cuda", dtype=dtype)


def memory_format_for(cfg: ExperimentConfig, device: torch.device) -> torch.memory_format:
    """channels_last by default on CUDA; ``training.channels_last`` decides when it is set."""
    import torch

    on = cfg.training.channels_last if cfg.training.channels_last is not None else device.type == "cuda"
    return torch.channels_last if on else torch.contiguous_format


def report_findings(cfg: ExperimentConfig, world_size: int, device: torch.device, *, skip: str = "data.") -> None:
    """Log ``check_config``'s warnings and errors once at start-up; keys under ``skip`` are left to the code
    that resolves the data (it names the paths it tried)."""
    for finding in check_config(cfg, world_size, device=device.type):
        if finding.severity != "info" and not finding.key.startswith(skip):
            log.warning("config %s: %s. %s", finding.key, finding.message, finding.advice)


@dataclass
class Stepper:
    """What turns losses into optimiser steps: DeepSpeed's engine, or an optimiser and schedule (and a
    GradScaler for fp16) around DDP or the bare model. The loop calls ``model``, ``no_sync``, ``backward``
    and ``step``; checkpoints call ``state_dict``, ``save`` and ``load``."""

    model: nn.Module  # what the loop calls: the engine, the DDP wrapper or the model
    optimizer: Any
    scheduler: Any
    accum: int
    clip: float | None
    scaler: Any = None
    engine: Any = None

    def no_sync(self, boundary: bool) -> Any:
        """DDP skips the gradient all-reduce off an accumulation boundary (forward and backward inside)."""
        from torch import nn

        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not boundary:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, weight: float | None = None) -> None:
        """Backward of ``loss`` divided over the accumulation steps (scaled under fp16; DeepSpeed's own).
        ``weight``: this micro-batch's factor instead of ``1/accum`` (``ShardedBatchSampler.loss_scale`` with
        global batches, whose parts differ in size)."""
        factor = 1 / self.accum if weight is None else weight
        if self.engine is not None:
            self.engine.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss * factor).backward()
        else:
            (loss * factor).backward()

    def step(self, boundary: bool, check: Callable[[], bool] | None = None) -> bool:
        """At an accumulation boundary: clip, step, schedule; returns whether an optimiser step was taken.
        ``check`` (``ratlib.numerics.Sentinel.check``) runs after unscaling, before clipping; when it answers
        False (the same on every rank) the step is skipped and the gradients dropped."""
        if self.engine is not None:  # DeepSpeed clips, steps and schedules at its own boundary
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.step()
            return boundary
        if not boundary:
            return False
        from torch import nn

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if check is not None and not check():
            if self.scaler is not None:
                self.scaler.update()  # ends this step's unscale_; an overflow also lowers the scale
            self.optimizer.zero_grad(set_to_none=True)
            return False
        if self.clip:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint file; DeepSpeed's (partitioned) state goes to its own folder (``save``)."""
        if self.engine is not None:
            return {"optimizer": None, "scheduler": None, "scaler": None}
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": scaler}

    def save(self, folder: Path, epoch: int, step: int, keep: int | None) -> None:
        """DeepSpeed only: its checkpoint under folder/epoch{E}, the oldest tags beyond ``keep`` removed."""
        if self.engine is None:
            return
        self.engine.save_checkpoint(str(folder), tag=f"epoch{epoch:04d}", client_state={"epoch": epoch, "step": step})
        if keep is not None and is_main_process():  # DeepSpeed never deletes its tags
            for old in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("epoch"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, state: dict[str, Any], folder: Path, path: Path) -> None:
        """Optimiser, schedule and scaler from the checkpoint ``state`` (read from ``path``), or DeepSpeed's
        from ``folder``; a checkpoint of the other kind is a UsageError that says which flag to set."""
        if self.engine is not None:
            tag = f"epoch{state['epoch']:04d}"
            if self.engine.load_checkpoint(str(folder), tag=tag)[0] is None:
                raise UsageError(
                    message(
                        f"--resume: {path} has no DeepSpeed state",
                        got=f"{folder / tag} is missing",
                        fix="resume with training.deepspeed.enabled=false as the run that wrote it, or start anew",
                    )
                )
            return
        if state.get("optimizer") is None:
            raise UsageError(
                message(
                    f"--resume: {path} was written by a DeepSpeed run",
                    got="training.deepspeed.enabled=false",
                    fix="set training.deepspeed.enabled=true",
                )
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def train_sampler(cfg: ExperimentConfig, num_samples: int, info: DistInfo, **kwargs: Any) -> ShardedBatchSampler:
    """The training sampler the config asks for: ``training.global_batch_size`` (the job's batch per step, any
    number of ranks; ``batch_size`` the largest micro-batch) or ``training.batch_size`` per device.
    ``kwargs`` go to ``ShardedBatchSampler`` (``augmentation_seeds``, ``group_ids``: per-device batches only)."""
    from ratlib.data import ShardedBatchSampler

    t = cfg.training
    common: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size, "seed": t.seed}
    if t.global_batch_size is None:
        return ShardedBatchSampler(num_samples, t.batch_size, **common, **kwargs)
    kwargs.pop("group_ids", None)  # grouping by aspect ratio needs per-device batches
    return ShardedBatchSampler(
        num_samples, global_batch_size=t.global_batch_size, micro_batch_size=t.batch_size, **common, **kwargs
    )


def loss_weight(sampler: Any, batch_len: int, batch_index: int, accum: int) -> float | None:
    """The factor for the mean loss of micro-batch ``batch_index`` (of this epoch) for ``Stepper.backward``:
    None with per-device batches (the Stepper's ``1/accum``); with global batches the sampler's ``loss_scale``
    at the global step the micro-batch belongs to, so that parts of unequal size weigh by their samples."""
    if getattr(sampler, "global_batch_size", None) is None:
        return None
    return float(sampler.loss_scale(batch_len, batch_index // accum))


def make_sentinel(cfg: ExperimentConfig, stepper: Stepper, run_dir: Path, pre: Any) -> Any:
    """``training.numerics`` as a ``ratlib.numerics.Sentinel`` on the stepper's model (reports appended to
    ``run_dir/numerics.jsonl``), or None: when off, and under DeepSpeed, which skips its own fp16 overflow steps
    and keeps ZeRO's gradients in its own buffers. ``pre``: the installed ``Preemption`` or None; the "stop"
    policy stops through it, so without it "stop" becomes "raise"."""
    n = cfg.training.numerics
    if n.policy == "off":
        return None
    if stepper.engine is not None:
        log.info("training.numerics is not applied under DeepSpeed (it checks and skips fp16 overflow itself)")
        return None
    from ratlib.numerics import Sentinel

    policy = n.policy
    if policy == "stop" and pre is None:
        log.warning("training.numerics.policy=stop stops through training.preemption, which is off: raise instead")
        policy = "raise"
    return Sentinel(
        stepper.model,
        policy=policy,
        drift_every=n.drift_every,
        exclude=n.exclude,
        max_skips=n.max_skips,
        run_dir=run_dir,
        grad_scaler=stepper.scaler,
    )


def make_stepper(
    cfg: ExperimentConfig,
    model: nn.Module,
    info: DistInfo,
    steps_per_epoch: int,
    total_steps: int,
    accumulation_steps: int | None = None,
) -> Stepper:
    """DeepSpeed's engine when ``training.deepspeed.enabled``, else DDP (several ranks) or the bare model,
    with the optimiser, the schedule and, for fp16 autocast, a GradScaler. Only ``info.device`` and
    ``info.world_size`` are read. ``accumulation_steps``: the sampler's, with global batches (default
    ``training.gradient_accumulation_steps``)."""
    import torch
    from torch import nn

    t, device = cfg.training, info.device
    params = [p for p in model.parameters() if p.requires_grad]
    if t.deepspeed.enabled:
        try:
            import deepspeed
        except ImportError:
            raise UsageError(
                message(
                    "training.deepspeed.enabled=true, but DeepSpeed is not installed",
                    fix="pip install 'ratlib[deepspeed]' (needs CUDA and a compiler), or set "
                    "training.deepspeed.enabled=false",
                )
            ) from None
        ds_config = to_deepspeed_config(cfg, info.world_size, steps_per_epoch=steps_per_epoch, device=device.type)
        if device.type != "cuda":  # as with autocast: no bf16/fp16 on the CPU
            ds_config["bf16"]["enabled"] = ds_config["fp16"]["enabled"] = False
        own_schedule = "scheduler" not in ds_config
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            config=ds_config,
            lr_scheduler=partial(make_scheduler, cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
            if own_schedule
            else None,
        )
        return Stepper(engine, optimizer, scheduler, t.gradient_accumulation_steps, t.gradient_clip, engine=engine)
    optimizer = make_optimizer(cfg, params, device)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    fp16 = getattr(autocast_for(cfg, device), "keywords", {}).get("dtype") == torch.float16
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    wrapped = model
    if info.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    accum = accumulation_steps or t.gradient_accumulation_steps
    return Stepper(wrapped, optimizer, scheduler, accum, t.gradient_clip, scaler)


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The command line of a training script: --config, --resume, --eval-only, --checkpoint, key=value
    overrides, and the ``--local_rank N`` / ``--local_rank=N`` / ``--local-rank=N`` that DeepSpeed's launcher
    adds (accepted and ignored: ratlib reads LOCAL_RANK from the environment, which wins)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: all defaults)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate a checkpoint")
    parser.add_argument("--checkpoint", help="with --eval-only: the checkpoint (default: the latest in output_dir)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.batch_size=4")
    return parser.parse_intermixed_args(argv)

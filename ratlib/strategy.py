"""What turns the training config into torch objects and steps: the one place where DDP, FSDP2 and DeepSpeed
differ. ``make_stepper`` builds the ``Stepper`` (``training.strategy``: DDP or the bare model, FSDP2's
``fully_shard`` per block and the root, or DeepSpeed's engine) with the optimiser, the schedule and, for fp16,
a GradScaler; the loop calls the same four things whichever it has::

    stepper = make_stepper(cfg, model, info, steps_per_epoch, total_steps)
    autocast = autocast_for(cfg, info.device)
    for i, batch in enumerate(loader):
        boundary = (i + 1) % stepper.accum == 0 or i + 1 == len(loader)
        with stepper.no_sync(boundary):
            with autocast():
                loss = loss_fn(stepper.model(batch))
            stepper.backward(loss)
        stepper.step(boundary)

Also the builders the stepper uses (``make_optimizer``, ``make_scheduler``/``lr_lambda``, ``autocast_for``,
``memory_format_for``), the training sampler the config asks for (``train_sampler``, ``loss_weight``) and
``training.numerics`` as a ``ratlib.numerics.Sentinel`` (``make_sentinel``). torch and deepspeed are imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratlib.config_defaults.args import UsageError
from ratlib.config_defaults.checks import check_config
from ratlib.config_defaults.deepspeed import to_deepspeed_config
from ratlib.config_defaults.schema import ExperimentConfig
from ratlib.errors import message
from ratlib.launch import is_main_process
from ratlib.rank_logger import get_logger

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ratlib.data import ShardedBatchSampler
    from ratlib.dist_init import DistInfo

__all__ = [
    "Stepper",
    "autocast_for",
    "count_steps",
    "eval_loader",
    "fork_can_deadlock",
    "fsdp_blocks",
    "loss_weight",
    "lr_lambda",
    "make_optimizer",
    "make_scheduler",
    "make_sentinel",
    "make_stepper",
    "memory_format_for",
    "report_findings",
    "train_loader",
    "train_sampler",
]

log = get_logger("ratlib.strategy")


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


def report_findings(
    cfg: ExperimentConfig, world_size: int, device: torch.device, *, skip: str = "data.", checks: Sequence[Any] = ()
) -> None:
    """Log ``check_config``'s warnings and errors once at start-up (with a script's own ``checks``, e.g. an
    example's ``EXAMPLE["checks"]``); keys under ``skip`` are left to the code that resolves the data (it names
    the paths it tried)."""
    extra: dict[str, Any] = {"checks": tuple(checks)} if checks else {}
    for finding in check_config(cfg, world_size, device=device.type, **extra):
        if finding.severity != "info" and not finding.key.startswith(skip):
            log.warning("config %s: %s. %s", finding.key, finding.message, finding.advice)


@dataclass
class Stepper:
    """What turns losses into optimiser steps: DeepSpeed's engine, or an optimiser and schedule (and a
    GradScaler for fp16) around DDP, FSDP2's sharded model or the bare model. The loop calls ``model``,
    ``no_sync``, ``backward`` and ``step``; checkpoints call ``state_dict``, ``load_state_dict`` and ``save``
    (``sharded``: the state holds only this rank's shards, so it is saved as a sharded checkpoint folder)."""

    model: nn.Module  # what the loop calls: the engine, the DDP wrapper or the (sharded) model
    optimizer: Any
    scheduler: Any
    accum: int
    clip: float | None
    scaler: Any = None
    engine: Any = None
    kind: str = "ddp"  # "single" (one process), "ddp", "fsdp2" or "deepspeed"

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp2"

    def no_sync(self, boundary: bool) -> Any:
        """Off an accumulation boundary the gradients stay local (forward and backward inside): DDP's
        ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``."""
        from torch import nn

        if self.kind == "fsdp2":
            self.model.set_requires_gradient_sync(boundary)  # type: ignore[operator]
        elif isinstance(self.model, nn.parallel.DistributedDataParallel) and not boundary:
            return self.model.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Around evaluation: under FSDP2 every rank gathers the whole weights once (a collective: every rank
        enters) and keeps them while inside, so that forwards need no collective and ranks may evaluate
        different numbers of batches (``ratlib.data.EvalSampler`` pads nothing); resharded on the way out.
        Elsewhere the weights are whole already: nothing happens."""
        if self.kind != "fsdp2":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        self.model.set_reshard_after_forward(False)  # type: ignore[operator]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
            self.model.set_reshard_after_forward(True)  # type: ignore[operator]
            # as fully_shard leaves the root: its weights stay gathered from forward to backward
            self.model.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]

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
        if self.clip:  # over FSDP2's DTensor gradients too: the norm of the whole, sharded, gradient
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
        """The model's weights, the optimiser, the schedule and the scaler, for a checkpoint. Under FSDP2 the
        weights and the optimiser state are this rank's shards (DTensors; ``sharded``), keyed by parameter
        name; DeepSpeed's optimiser state goes to its own folder (``save``)."""
        from ratlib.checkpoint import unwrap_model

        scaler = self.scaler.state_dict() if self.scaler is not None else None
        if self.engine is not None:
            model = unwrap_model(self.model).state_dict()
            return {"model": model, "optimizer": None, "scheduler": None, "scaler": None}
        if self.kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import get_state_dict

            from ratlib.comm import broadcast_buffers

            # FSDP2 leaves buffers (BatchNorm statistics) per rank: the checkpoint holds rank 0's, as under DDP
            broadcast_buffers(self.model)
            model, optimizer = get_state_dict(self.model, self.optimizer)
        else:
            model, optimizer = unwrap_model(self.model).state_dict(), self.optimizer.state_dict()
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": scaler}

    def load_state_dict(self, state: dict[str, Any], folder: Path, path: Path) -> None:
        """Weights, optimiser, schedule and scaler from the checkpoint ``state`` (read from ``path``), or
        DeepSpeed's from ``folder``; a checkpoint of another strategy is a UsageError that says what to set."""
        from ratlib.checkpoint import unwrap_model

        if self.engine is not None:
            unwrap_model(self.model).load_state_dict(state["model"])
            tag = f"epoch{state['epoch']:04d}"
            if self.engine.load_checkpoint(str(folder), tag=tag)[0] is None:
                raise UsageError(
                    message(
                        f"--resume: {path} has no DeepSpeed state",
                        got=f"{folder / tag} is missing",
                        fix="resume with the training.strategy of the run that wrote it, or start anew",
                    )
                )
            return
        if state.get("optimizer") is None:
            raise UsageError(
                message(
                    f"--resume: {path} was written by a DeepSpeed run",
                    got=f"training.strategy={self.kind}",
                    fix="set training.strategy=deepspeed",
                )
            )
        names = [n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad]  # optimiser order
        if self.kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            # a whole state (a DDP run's .pt) is sharded here; a sharded folder was read into our own shards
            whole = not any(type(v).__name__ == "DTensor" for v in state["model"].values())
            optimizer = _optimizer_by_name(state["optimizer"], names)
            options = StateDictOptions(full_state_dict=whole)
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optimizer, options=options
            )
        else:  # also from an FSDP2 run's folder, read as whole tensors: its optimiser state is keyed by name
            unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(_optimizer_by_index(state["optimizer"], names))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, folder: Path, epoch: int, step: int, keep: int | None) -> None:
        """DeepSpeed only: its checkpoint under folder/epoch{E}, the oldest tags beyond ``keep`` removed."""
        if self.engine is None:
            return
        self.engine.save_checkpoint(str(folder), tag=f"epoch{epoch:04d}", client_state={"epoch": epoch, "step": step})
        if keep is not None and is_main_process():  # DeepSpeed never deletes its tags
            for old in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("epoch"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)


def train_sampler(cfg: ExperimentConfig, num_samples: int, info: DistInfo, **kwargs: Any) -> ShardedBatchSampler:
    """The training sampler the config asks for: ``training.global_batch_size`` (the job's batch per step, any
    number of ranks; ``batch_size`` the largest micro-batch) or ``training.batch_size`` per device.
    ``kwargs`` go to ``ShardedBatchSampler`` (``augmentation_seeds``, ``group_ids``: per-device batches only)."""
    from ratlib.data import ShardedBatchSampler

    t = cfg.training
    common: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size, "seed": t.seed}
    if t.global_batch_size is None:
        return ShardedBatchSampler(num_samples, t.batch_size, **common, **kwargs)
    if kwargs.pop("group_ids", None) is not None:  # grouping by aspect ratio needs per-device batches
        log.warning(
            "training.global_batch_size=%d: batches are not grouped by aspect ratio (group_ids), since a global "
            "batch's parts come from one global order; set training.global_batch_size=null to group them",
            t.global_batch_size,
        )
    return ShardedBatchSampler(
        num_samples, global_batch_size=t.global_batch_size, micro_batch_size=t.batch_size, **common, **kwargs
    )


def fork_can_deadlock(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this interpreter's ``os.fork()`` can hang the child forever (CPython gh-112275): a thread that
    was creating or deleting its thread state at the fork (a gloo thread running a DDP comm hook's Python
    callback, in the case found) leaves the child waiting on a lock nobody releases. 3.10, and 3.11 before
    3.11.10, have it; 3.12 does not."""
    return version[:2] == (3, 10) or (3, 11) <= version < (3, 11, 10)


@functools.cache
def _note_fork_risk() -> None:
    """One line, once per process, where forked DataLoader workers can hang (``fork_can_deadlock``)."""
    if fork_can_deadlock() and sys.platform.startswith("linux"):
        log.info(
            "Python %s can hang a forked DataLoader worker, rarely (CPython gh-112275); Python 3.12 or >= 3.11.10 "
            "cannot: upgrade, or pass multiprocessing_context='forkserver' (each worker then starts slower)",
            ".".join(map(str, sys.version_info[:3])),
        )


def _loader(
    cfg: ExperimentConfig, dataset: Any, info: DistInfo, collate_fn: Any, context: Any, **how: Any
) -> torch.utils.data.DataLoader:
    """What both loaders share: ``data.num_workers`` workers started as ``context`` says, pinned memory on CUDA."""
    import torch

    if cfg.data.num_workers and context is None:
        _note_fork_risk()
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_fn,
        pin_memory=info.device.type == "cuda",
        multiprocessing_context=context,
        **how,
    )


def train_loader(
    cfg: ExperimentConfig, dataset: Any, sampler: ShardedBatchSampler, info: DistInfo, collate_fn: Any = None, *,
    multiprocessing_context: Any = None,
) -> torch.utils.data.DataLoader:  # fmt: skip
    """The training ``DataLoader`` over ``sampler`` (``train_sampler``): ``data.num_workers`` persistent workers,
    pinned memory on CUDA, and a generator of its own seeded with ``training.seed``, whose draws (the workers'
    seeds) leave the global RNG alone, so that a resumed run's RNG continues where the stopped run's was.
    ``multiprocessing_context``: how workers start (default fork; see ``fork_can_deadlock``)."""
    import torch

    generator = torch.Generator().manual_seed(cfg.training.seed)
    how = {"batch_sampler": sampler, "persistent_workers": cfg.data.num_workers > 0, "generator": generator}
    return _loader(cfg, dataset, info, collate_fn, multiprocessing_context, **how)


def eval_loader(
    cfg: ExperimentConfig, dataset: Any, info: DistInfo, collate_fn: Any = None, *, multiprocessing_context: Any = None
) -> torch.utils.data.DataLoader:
    """This rank's share of ``dataset`` for evaluation: each sample on exactly one rank, nothing padded
    (``ratlib.data.EvalSampler``; merge the ranks' results with ``gather_by_index``), in batches of
    ``eval.batch_size`` (null: ``training.batch_size``)."""
    from ratlib.data import EvalSampler

    sampler = EvalSampler(len(dataset), rank=info.rank, world_size=info.world_size)
    batch = cfg.eval.batch_size or cfg.training.batch_size
    return _loader(cfg, dataset, info, collate_fn, multiprocessing_context, batch_size=batch, sampler=sampler)


def _optimizer_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A torch optimiser state keyed by parameter index (``optimizer.state_dict()``) keyed by parameter name, as
    FSDP2's ``get_state_dict`` keys it; a state keyed by name already comes back as it is."""
    if all(isinstance(k, str) for g in state["param_groups"] for k in g["params"]):
        return state
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def _optimizer_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The reverse of ``_optimizer_by_name``: what ``optimizer.load_state_dict`` of a DDP run takes."""
    if all(isinstance(k, int) for g in state["param_groups"] for k in g["params"]):
        return state
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def count_steps(cfg: ExperimentConfig, sampler: Any) -> tuple[int, int, int]:
    """``(accumulation, steps_per_epoch, total_steps)``: micro-batches per optimiser step (the sampler's with a
    global batch, else ``training.gradient_accumulation_steps``), optimiser steps per epoch (a last partial
    accumulation counts as a step) and in the whole run (``training.max_steps`` when it is fewer)."""
    t = cfg.training
    accum = sampler.accumulation_steps if t.global_batch_size else t.gradient_accumulation_steps
    per_epoch = math.ceil(sampler.batches_per_epoch / accum)
    total = per_epoch * t.num_epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.num_epochs)
    return accum, per_epoch, total


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
    *,
    blocks: Sequence[nn.Module] | None = None,
) -> Stepper:
    """The ``Stepper`` for ``training.strategy``: DeepSpeed's engine, FSDP2 (``fully_shard`` on each of
    ``blocks``, default ``fsdp_blocks(model)``, then on the root) or DDP on several ranks; the bare model in
    one process whichever is set. With the optimiser (built on the sharded parameters), the schedule and, for
    fp16 autocast, a GradScaler. Only ``info.device`` and ``info.world_size`` are read.
    ``accumulation_steps``: the sampler's, with global batches (default ``training.gradient_accumulation_steps``)."""
    import torch
    from torch import nn

    t, device = cfg.training, info.device
    if t.strategy == "deepspeed":
        return _deepspeed_stepper(cfg, model, info, steps_per_epoch, total_steps)
    autocast = autocast_for(cfg, device)
    dtype = getattr(autocast, "keywords", {}).get("dtype")
    wrapped, kind = model, "single"
    if info.world_size > 1 and t.strategy == "fsdp2":
        wrapped, kind = _fully_shard(model, info, dtype, blocks), "fsdp2"
    elif info.world_size > 1:
        ids = [device] if device.type == "cuda" else None
        wrapped, kind = nn.parallel.DistributedDataParallel(model, device_ids=ids), "ddp"
    elif t.strategy == "fsdp2":
        log.info("training.strategy=fsdp2 with one process: nothing to shard, the bare model trains")
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    accum = accumulation_steps or t.gradient_accumulation_steps
    _log_batches(cfg, info, kind, accum, steps_per_epoch, total_steps)
    return Stepper(wrapped, optimizer, scheduler, accum, t.gradient_clip, scaler, kind=kind)


def _log_batches(cfg: ExperimentConfig, info: DistInfo, kind: str, accum: int, per_epoch: int, total: int) -> None:
    """One line: how the global batch is made, and the optimiser steps (the figures a resume must keep)."""
    t = cfg.training
    batch = t.global_batch_size or info.world_size * t.batch_size * accum
    log.info(
        f"{kind}: {info.world_size} ranks x batch {t.batch_size} x accumulation {accum} = global batch {batch}; "
        f"{per_epoch} optimiser steps per epoch, {total} in all; device {info.device}"
    )


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one (each gathers its weights just before its forward): the items of the
    model's top-level ``ModuleList``/``Sequential`` children and its other top-level children that hold
    parameters. A model with its own idea passes ``blocks=`` to ``make_stepper``."""
    from torch import nn

    found: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            found.extend(c for c in child if any(True for _ in c.parameters()))
        elif any(True for _ in child.parameters()):
            found.append(child)
    return found


def _fully_shard(model: nn.Module, info: DistInfo, dtype: Any, blocks: Sequence[nn.Module] | None) -> nn.Module:
    """FSDP2 over all ranks: each block, then the root; on CUDA under bf16/fp16 autocast the weights are
    gathered in that dtype and gradients reduced in float32 (``MixedPrecisionPolicy``)."""
    import torch

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise UsageError(
            message(
                "training.strategy=fsdp2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)",
                got=f"torch {torch.__version__}",
                fix="upgrade torch, or set training.strategy=ddp",
            )
        ) from None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy()
    if info.device.type == "cuda" and dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in fsdp_blocks(model) if blocks is None else blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _deepspeed_stepper(
    cfg: ExperimentConfig, model: nn.Module, info: DistInfo, steps_per_epoch: int, total_steps: int
) -> Stepper:
    """DeepSpeed's engine (``training.strategy=deepspeed``): it clips, steps, schedules and accumulates."""
    t, device = cfg.training, info.device
    try:
        import deepspeed
    except ImportError:
        raise UsageError(
            message(
                "training.strategy=deepspeed, but DeepSpeed is not installed",
                fix="pip install 'ratlib[deepspeed]' (needs CUDA and a compiler), or set training.strategy=ddp",
            )
        ) from None
    ds_config = to_deepspeed_config(cfg, info.world_size, steps_per_epoch=steps_per_epoch, device=device.type)
    if device.type != "cuda":  # as with autocast: no bf16/fp16 on the CPU
        ds_config["bf16"]["enabled"] = ds_config["fp16"]["enabled"] = False
    own_schedule = "scheduler" not in ds_config
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=partial(make_scheduler, cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        if own_schedule
        else None,
    )
    accum, clip = t.gradient_accumulation_steps, t.gradient_clip
    _log_batches(cfg, info, "deepspeed", accum, steps_per_epoch, total_steps)
    return Stepper(engine, optimizer, scheduler, accum, clip, engine=engine, kind="deepspeed")

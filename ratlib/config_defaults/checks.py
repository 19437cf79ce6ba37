"""``check_config``: risky settings of a valid config, before GPU hours burn; ``register_check`` for a
project's own rules.

A check is a function ``check(cfg, world_size) -> Iterable[Finding]``. ``register_check(fn)`` adds it to
every later ``check_config`` call (``schema=`` limits it to configs of that class, so one process can
import several examples), and ``check_config(..., checks=[fn])`` adds one for a single call.
``ratlib doctor`` calls ``check_config``, so registered rules show up there too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ratlib.config_defaults.schema import DataConfig, ExperimentConfig
from ratlib.memory import MemoryProbe, estimate_model_memory

__all__ = ["Check", "Finding", "check_config", "register_check", "unregister_check"]


@dataclass(frozen=True)
class Finding:
    """A risky setting: ``severity`` ("error", "warning" or "info"), the ``key`` path, what is wrong
    (``message``) and what to do (``advice``)."""

    severity: Literal["error", "warning", "info"]
    key: str
    message: str
    advice: str

    def __str__(self) -> str:
        stop = "" if self.message.endswith((".", "?", "!")) else "."
        return f"{self.severity.upper()} {self.key}: {self.message}{stop} {self.advice}"


#: A project's own rule: ``check(cfg, world_size)`` returns the findings it has (an empty list when none).
Check = Callable[[Any, int], Iterable[Finding]]

_REGISTERED: list[tuple[Check, type[BaseModel] | None]] = []


def register_check(check: Check, *, schema: type[BaseModel] | None = None) -> Check:
    """Run ``check(cfg, world_size)`` in every later ``check_config`` call (for configs that are
    instances of ``schema`` only, when given); returns ``check``, so it also works as a decorator.
    Registering the same function for the same schema again replaces that registration; for another
    schema (a module defining it reloaded) it is added, so configs of either class keep the rule."""
    _REGISTERED[:] = [(c, s) for c, s in _REGISTERED if not (c is check and s is schema)]
    _REGISTERED.append((check, schema))
    return check


def unregister_check(check: Check) -> None:
    """Remove a check that ``register_check`` added (nothing happens if it is not registered)."""
    _REGISTERED[:] = [(c, s) for c, s in _REGISTERED if c is not check]


def _cuda_memory_gib() -> float | None:
    """Memory of GPU 0 in GiB, or None without CUDA (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def _split_batch(batch: int, accumulation: int, target: int) -> tuple[int, int]:
    """A smaller per-device batch and a larger accumulation with the same product (or just above)."""
    for k in range(2, batch + 1):
        if batch % k == 0 and batch // k <= target:
            return batch // k, accumulation * k
    k = math.ceil(batch / target)
    return math.ceil(batch / k), accumulation * k


def _stage_that_fits(model: Any, cfg: ExperimentConfig, world_size: int, budget: float) -> str:
    t = cfg.training
    for stage, offload in ((1, False), (2, False), (3, False), (2, True), (3, True)):
        est = estimate_model_memory(
            model,
            world_size=world_size,
            precision="mixed" if t.mixed_precision else "fp32",
            optimizer=t.optimizer.name,
            momentum=t.optimizer.momentum,
            zero_stage=stage,
            offload=offload,
        )
        if est.total_bytes <= budget:
            return (
                f"enable DeepSpeed ZeRO stage {stage}{' with offload' if offload else ''} "
                f"(training.deepspeed.enabled=true, zero_stage={stage}{', offload=true' if offload else ''}): "
                f"{est.total_bytes / 2**30:.1f} GiB per GPU at {world_size} rank(s)"
            )
    return "no ZeRO stage fits at this world size: use more GPUs, or a smaller model"


def _data_findings(data: DataConfig) -> list[Finding]:
    findings = []
    paths = {"root": data.root} if data.root is not None else {}
    paths.update(
        {
            k: v
            for k, v in (data.model_extra or {}).items()
            if isinstance(v, str) and k.endswith(("_path", "_dir", "_root", "_file"))
        }
    )
    for key, value in paths.items():
        resolved = Path(os.path.expandvars(value)).expanduser()
        if not resolved.exists():
            findings.append(
                Finding(
                    "error",
                    f"data.{key}",
                    f"{value!r} does not exist (resolved to {resolved.absolute()})",
                    "fix the path" + (", or drop data.root to use the synthetic default" if key == "root" else ""),
                )
            )
    extra = data.model_extra or {}
    splits = {k: v for k, v in extra.items() if k in ("split", "train_split", "val_split", "test_split")}
    if data.root is not None and splits and Path(os.path.expandvars(data.root)).expanduser().is_dir():
        from ratlib.coco_paths import CocoPathError, resolve_coco

        for key, split in splits.items():
            try:
                resolve_coco(os.path.expandvars(data.root), str(split))
            except (CocoPathError, ValueError) as exc:
                findings.append(
                    Finding(
                        "error",
                        f"data.{key}",
                        f"COCO split {split!r} under {data.root!r}: " + str(exc).splitlines()[0].rstrip("."),
                        f"run `ratlib coco {data.root} {split}` for the paths tried and found",
                    )
                )
    return findings


def check_config(
    cfg: ExperimentConfig,
    world_size: int = 1,
    *,
    model: Any = None,
    probe: MemoryProbe | None = None,
    device: str | None = None,
    device_memory_gib: float | None = None,
    max_batch_size: int = 64,
    checks: Iterable[Check] = (),
) -> list[Finding]:
    """Risky settings, before GPU hours burn; an empty list when none.

    - the global batch (per-device batch x accumulation x ``world_size``), as info;
    - a per-device batch that may not fit: above ``probe.max_batch_size`` when a ``probe_memory``
      result is given, else above ``max_batch_size`` (the rule of thumb: 80 ran out of memory,
      32 to 48 fit the examples' models on one 80 GiB GPU);
    - a model too large for plain data parallelism: model states over half the device memory by
      ``estimate_model_memory`` when ``model`` (a module or parameter count) is given; the advice names
      the ZeRO stage that fits (a project can add its own size rule for ``model=None``: ``register_check``);
    - data paths that do not exist (``data.root`` and ``data.*_path/_dir/_root/_file``), and COCO
      splits (``data.split``, ``train_split``, ...) that ``ratlib.coco_paths`` cannot resolve;
    - mixed precision or compile on CPU, DeepSpeed asked for but not installed, offload at stage 0,
      warmup as long as training, more loader workers than CPUs.

    Then the registered checks (``register_check``) and ``checks``, in that order.
    ``device`` (a torch device type: "cpu", "cuda", ...) and ``device_memory_gib`` default to this machine's
    (80 GiB assumed without a GPU).
    """
    t = cfg.training
    findings: list[Finding] = []
    if device is None:
        memory = device_memory_gib if device_memory_gib is not None else _cuda_memory_gib()
        device = "cuda" if memory is not None else "cpu"
    else:
        memory = (
            device_memory_gib if device_memory_gib is not None else (_cuda_memory_gib() if device == "cuda" else None)
        )
    budget_gib = memory if memory is not None else 80.0
    assumed = "" if memory is not None else " (80 GiB assumed: no GPU seen here; pass device_memory_gib)"

    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    findings.append(
        Finding(
            "info",
            "training.batch_size",
            f"global batch {global_batch} = {t.batch_size} per device x "
            f"{t.gradient_accumulation_steps} accumulation x {world_size} rank(s)",
            "batch_size is per device; scale the learning rate with the global batch",
        )
    )
    small, accum = _split_batch(
        t.batch_size,
        t.gradient_accumulation_steps,
        probe.max_batch_size if probe is not None else max(1, max_batch_size * 3 // 4),
    )
    keep = (
        f"set training.batch_size={small} and training.gradient_accumulation_steps={accum} "
        f"(global batch {small * accum * world_size})"
    )
    if probe is not None and t.batch_size > probe.max_batch_size:
        need = probe.predict(t.batch_size) / 2**30
        findings.append(
            Finding(
                "error" if probe.predict(t.batch_size) > probe.capacity_bytes else "warning",
                "training.batch_size",
                f"per-device batch {t.batch_size} needs about {need:.1f} GiB by the measured probe; "
                f"{probe.max_batch_size} fits in {probe.fraction:.0%} of {probe.capacity_bytes / 2**30:.0f} GiB",
                keep,
            )
        )
    elif probe is None and t.batch_size > max_batch_size:
        findings.append(
            Finding(
                "warning",
                "training.batch_size",
                f"per-device batch {t.batch_size} is above max_batch_size={max_batch_size}, "
                "likely to run out of memory (batch_size is per device, not global)",
                keep + "; or measure with probe_memory and a smoke run",
            )
        )

    budget = 0.5 * budget_gib * 2**30  # half for model states, half for activations
    if model is not None:
        stage = t.deepspeed.zero_stage if t.deepspeed.enabled else 0
        est = estimate_model_memory(
            model,
            world_size=world_size,
            precision="mixed" if t.deepspeed.enabled and t.mixed_precision else "fp32",
            optimizer=t.optimizer.name,
            momentum=t.optimizer.momentum,
            zero_stage=stage,
            offload=t.deepspeed.enabled and t.deepspeed.offload,
        )
        if est.total_bytes > budget:
            findings.append(
                Finding(
                    "error" if est.total_bytes > budget_gib * 2**30 else "warning",
                    "model",
                    f"model states need {est}, over half of {budget_gib:.0f} GiB{assumed}",
                    _stage_that_fits(model, cfg, world_size, budget),
                )
            )
    findings += _data_findings(cfg.data)
    if device == "cpu":
        if t.mixed_precision:
            findings.append(
                Finding(
                    "info",
                    "training.mixed_precision",
                    f"mixed_precision={t.mixed_precision!r} on CPU: autocast there is slow or unsupported",
                    "set training.mixed_precision=false for CPU runs",
                )
            )
        if t.compile:
            findings.append(
                Finding(
                    "info",
                    "training.compile",
                    "torch.compile on CPU takes long to compile",
                    "keep training.compile=false for short CPU runs",
                )
            )
    if t.deepspeed.enabled:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            findings.append(
                Finding(
                    "error",
                    "training.deepspeed.enabled",
                    "DeepSpeed is enabled but not installed",
                    "pip install 'ratlib[deepspeed]', or set training.deepspeed.enabled=false",
                )
            )
        if t.deepspeed.offload and t.deepspeed.zero_stage == 0:
            findings.append(
                Finding(
                    "warning",
                    "training.deepspeed.offload",
                    "offload needs ZeRO stage 1 or higher",
                    "set training.deepspeed.zero_stage=2 (or 3)",
                )
            )
    if t.scheduler.name != "constant" and t.scheduler.warmup_epochs >= t.num_epochs:
        findings.append(
            Finding(
                "warning",
                "training.scheduler.warmup_epochs",
                f"warmup_epochs={t.scheduler.warmup_epochs} is not below num_epochs={t.num_epochs}: "
                "the schedule never gets past warmup",
                "shorten the warmup",
            )
        )
    cpus = os.cpu_count() or 1
    if cfg.data.num_workers > cpus:
        findings.append(
            Finding(
                "warning",
                "data.num_workers",
                f"num_workers={cfg.data.num_workers} per rank is more than the {cpus} CPUs here",
                f"set data.num_workers to at most {cpus}",
            )
        )
    for check, schema in [*_REGISTERED, *((c, None) for c in checks)]:
        if schema is None or isinstance(cfg, schema):
            findings += list(check(cfg, world_size))
    return findings

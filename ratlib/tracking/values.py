"""What the tracker logs: the metrics helpers (learning rates, memory, the loop's step line), a config as flat
keys, a metric as plain data; and the pieces every part of ``ratlib.tracking`` shares (its error, its logger,
"am I the main rank")."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from ratlib.errors import RatlibError


class TrackingError(RatlibError, ValueError):
    """A tracking call that is wrong in the caller's code (a step that goes back, an unknown backend)."""


def _log() -> Any:
    from ratlib.rank_logger import get_logger

    return get_logger("ratlib.tracking")


def _is_main() -> bool:
    """The main rank, as ``ratlib.dist_init`` decides; an unknown rank (bad launcher variables) is not."""
    from ratlib.dist_init import is_main_process
    from ratlib.launch import DistInitError

    try:
        return is_main_process()
    except DistInitError:
        return False


# ----------------------------------------------------------------------------------------------
# Helpers that build what to log


def lr_metrics(optimizer: Any, prefix: str = "lr") -> dict[str, float]:
    """The learning rate of each parameter group: ``{"lr": ...}``, or ``lr/group0``, ``lr/group1``, ..."""
    groups = optimizer.param_groups
    if len(groups) == 1:
        return {prefix: float(groups[0]["lr"])}
    return {f"{prefix}/group{i}": float(g["lr"]) for i, g in enumerate(groups)}


def log_step(
    tracker: Any,  # a ratlib.tracking.Tracker (tracker.py imports this module)
    step: int,
    loss: Any,
    optimizer: Any,
    *,
    every: int,
    last: int | None = None,
    epoch: int | None = None,
    seconds_per_step: float | None = None,
    **terms: Any,
) -> bool:
    """The training loop's step line, every ``every`` optimiser steps and at ``last``: ``train/loss`` (one
    ``.item()``, the only host sync), the learning rate (``lr_metrics``) and ``train/<term>`` for each of
    ``terms``, to the tracker and the log. Returns whether it logged. A non-finite loss is only reported here;
    stopping at it is ``ratlib.numerics``'s."""
    if step % every and step != last:
        return False
    value = float(loss.item() if hasattr(loss, "item") else loss)
    if not math.isfinite(value):
        _log().warning("step %d: the loss is %s", step, value)
    lrs = lr_metrics(optimizer)
    tracker.log({"train/loss": value, **{f"train/{k}": v for k, v in terms.items()}, **lrs}, step)
    where = f"epoch {epoch} step {step}" if epoch is not None else f"step {step}"
    pace = f" ({seconds_per_step:.3f} s/step)" if seconds_per_step is not None else ""
    _log().info("%s: loss %.4f lr %.3g%s", where, value, next(iter(lrs.values())), pace)
    return True


def memory_metrics(report: Any, prefix: str = "memory") -> dict[str, float]:
    """Per-rank peak memory scalars (GiB) from a ``ratlib.memory.MemoryReport``.

    ``memory_report`` is a collective: call it on every rank and pass its result here (the tracker
    runs no collectives, so it cannot gather the figures itself).
    """
    gib = 1024**3
    out: dict[str, float] = {}
    for r in report.ranks:
        out[f"{prefix}/rank{r.rank}_peak_gib"] = round(r.peak / gib, 4)
        out[f"{prefix}/rank{r.rank}_allocated_gib"] = round(r.peak_allocated / gib, 4)
    top = report.max
    out[f"{prefix}/max_peak_gib"] = round(top.peak / gib, 4)
    out[f"{prefix}/max_rank"] = top.rank
    return out


def _plain(config: Any) -> Any:
    if hasattr(config, "model_dump"):  # pydantic models (ratlib.config_defaults)
        return config.model_dump(mode="json")
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    return config


def flatten_config(config: Any, sep: str = ".") -> dict[str, Any]:
    """A config (mapping, pydantic model or dataclass) as flat ``{"training.lr": 1e-4, ...}``."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        value = _plain(value)
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{prefix}{sep}{key}" if prefix else str(key))
        else:
            out[prefix or "config"] = value

    walk(config, "")
    return out


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a record (what TensorBoard, W&B and MLflow take); others stay in jsonl."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


def _value(value: Any) -> Any:
    """A metric as plain data, read now on the caller's thread (a tensor may change in place later)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    numel = getattr(value, "numel", None)  # torch tensors; numpy has .size
    size = numel() if callable(numel) else getattr(value, "size", None)
    if hasattr(value, "item") and size == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)

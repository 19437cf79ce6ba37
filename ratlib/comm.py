"""Collectives that are also correct with no process group (world size 1).

Every function works the same in a single process (returns the local value) and over any backend.
Each public collective first calls ``_before_collective`` so that ``ratlib.hang`` (when imported and
asked to) can check that all ranks are in the same collective from the same call site.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["all_gather_object", "all_reduce_mean", "broadcast_object", "gather_object", "reduce_dict"]

T = TypeVar("T")


def _before_collective(op: str) -> None:
    hang = sys.modules.get("ratlib.hang")
    if hang is not None:
        hang.before_collective(op)


def _dist() -> Any | None:
    """torch.distributed when a group with more than one rank exists, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist


def _device(dist: Any) -> Any:
    import torch

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(x: T) -> T:
    """Mean of ``x`` over all ranks; ``x`` is a tensor (returned as a new tensor) or a Python number."""
    _before_collective("all_reduce_mean")
    dist = _dist()
    if dist is None:
        return x.clone() if hasattr(x, "clone") else x  # type: ignore[return-value]
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
        if not (t.is_floating_point() or t.is_complex()):
            t = t.double()
        dist.all_reduce(t)
        return t / dist.get_world_size()  # type: ignore[return-value]
    if not isinstance(x, (int, float)):
        raise TypeError(f"all_reduce_mean: expected a tensor or a number, got {type(x).__name__}")
    t = torch.tensor([float(x)], dtype=torch.float64, device=_device(dist))
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()  # type: ignore[return-value]


def reduce_dict(d: Mapping[str, Any], average: bool = True) -> dict[str, Any]:
    """Sum (or mean, with ``average``) of each value over all ranks, in one collective.

    Values are scalar tensors or numbers; every rank must pass the same keys. Tensors come back as
    tensors, numbers as floats, on every rank.
    """
    _before_collective("reduce_dict")
    dist = _dist()
    keys = sorted(d)
    if dist is None:
        return {k: d[k] for k in keys}
    import torch

    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, keys)
    if any(n != keys for n in names):
        raise ValueError(f"reduce_dict: ranks passed different keys: {dict(enumerate(names))}; "
                         "every rank must reduce the same dict keys")
    device = _device(dist)
    values = torch.stack([torch.as_tensor(d[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(values)
    if average:
        values /= dist.get_world_size()
    out: dict[str, Any] = {}
    for k, v in zip(keys, values):
        src = d[k]
        out[k] = v.to(dtype=src.dtype, device=src.device) if isinstance(src, torch.Tensor) else float(v.item())
    return out


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Picklable ``obj`` from every rank, as a list by rank on ``dst``; None on the other ranks."""
    _before_collective("gather_object")
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj: T) -> list[T]:
    """Picklable ``obj`` from every rank, as a list by rank, on every rank."""
    _before_collective("all_gather_object")
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``src``'s picklable ``obj`` on every rank (the other ranks' argument is ignored)."""
    _before_collective("broadcast_object")
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

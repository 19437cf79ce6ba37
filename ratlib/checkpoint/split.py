"""A checkpoint's state split in two for a sharded save: its tensors (DTensors and plain ones, by flat dotted
key, for torch.distributed.checkpoint) and everything else (plain data, with a reference where each tensor sat),
and the check that the plain part loads with ``weights_only=True``."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ratlib.checkpoint._common import CheckpointArgumentError, CheckpointError, _refused_types, _short
from ratlib.errors import message

__all__ = ["join_state", "split_state"]

_TENSOR = "__ratlib_tensor__"  # in plain.pt, where a tensor of the DCP part sits in the structure


def split_state(state: Mapping[str, Any], what: str = "state") -> tuple[Any, dict[str, Any]]:
    """``(skeleton, tensors)``: ``tensors`` maps dotted keys (``model.0.weight``, ``optimizer.state.0.exp_avg``)
    to the tensors of ``state``; ``skeleton`` is ``state`` with each tensor replaced by a reference to its key."""
    import copy

    import torch

    tensors: dict[str, Any] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor) or type(obj).__name__ in {"ShardedTensor", "DTensor"}:
            if key in tensors:
                raise CheckpointArgumentError(
                    message(
                        f"checkpoint: two tensors of the {what} have the same dotted key {key!r}",
                        fix="rename one of the keys (a key with a dot in it can collide with a nested one)",
                    )
                )
            tensors[key] = obj
            return {_TENSOR: key}
        if isinstance(obj, Mapping):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    if not isinstance(state, Mapping):
        raise CheckpointArgumentError(
            message(f"checkpoint: the {what} is a {type(state).__name__}", expected="a dict of named items")
        )
    return walk(state, ""), tensors


def join_state(skeleton: Any, tensors: Mapping[str, Any]) -> Any:
    """The inverse of :func:`split_state`: references replaced by ``tensors[key]`` (left out when absent)."""
    if isinstance(skeleton, dict):
        if len(skeleton) == 1 and _TENSOR in skeleton:
            return tensors.get(skeleton[_TENSOR])
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(join_state(v, tensors) for v in skeleton)
    return skeleton


def _plain_bytes(obj: Any, path: Path, what: str) -> bytes:
    """``obj`` as torch.save bytes, checked to load with ``weights_only=True`` (refused now, not at resume)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as exc:  # noqa: BLE001
        types = _refused_types(io.BytesIO(buffer.getvalue()), exc)
        raise CheckpointError(
            message(
                f"checkpoint.save({str(path)!r}): the {what} holds objects that would not load with "
                "weights_only=True (loading would have to run code); nothing was written",
                got=f"refused: {', '.join(types) or _short(exc)}",
                fix="store plain data (numbers, strings, lists, dicts, tensors): e.g. a config as a dict, "
                "NumPy values as lists or tensors",
            )
        ) from exc
    return buffer.getvalue()

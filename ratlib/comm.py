"""Collectives that give the same answer, in the same types, with one process and no group as with many.

Code written against these runs unchanged in a single process (tests, notebooks, debugging) and under
torchrun: each function returns what the collective would return at world size 1 and checks its
arguments the same way, so a mistake shows up before the job is scaled out.

With no process group the collectives answer as at world size 1 only when the launcher's world size is
1: under a launcher that started several processes, a collective before ``init_distributed()`` raises
``NoProcessGroupError`` instead of returning each rank's own value (a silently wrong metric).

Every public collective first calls the collective hook, which ``ratlib.hang.install(check_collectives=True)``
registers (``set_collective_hook``) to check that all ranks are in the same collective from the same call
site; this module never imports ``ratlib.hang``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, overload

from ratlib.errors import RatlibError, message
from ratlib.launch import process_group, rank_state

__all__ = [
    "ChannelError",
    "CollectiveArgumentError",
    "CollectiveTypeError",
    "NoProcessGroupError",
    "RankMismatchError",
    "StoreChannel",
    "all_gather_object",
    "all_reduce_mean",
    "assert_same",
    "broadcast_buffers",
    "broadcast_object",
    "gather_object",
    "reduce_dict",
    "set_collective_hook",
]

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class NoProcessGroupError(RatlibError, RuntimeError):
    """A collective was called under a multi-process launcher before the process group exists."""


class RankMismatchError(RatlibError, ValueError):
    """``assert_same``: the ranks hold different values; the message names the ranks and the keys."""


class CollectiveArgumentError(RatlibError, ValueError):
    """A collective was given a value it cannot reduce or a rank that is not in the job."""


class CollectiveTypeError(CollectiveArgumentError, TypeError):
    """A collective was given a value of a type it cannot reduce."""


_collective_hook: Callable[[str], None] | None = None


def set_collective_hook(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(op)`` before every collective here (None: no hook). ``ratlib.hang`` registers its check."""
    global _collective_hook
    _collective_hook = hook


def _before_collective(op: str) -> None:
    # Call depth matters to the hook: public function -> _before_collective -> hook.
    if _collective_hook is not None:
        _collective_hook(op)


def _dist(op: str) -> Any | None:
    """torch.distributed when a group with more than one rank exists, else None (world size 1).

    Without a group, a launcher world size above 1 (or invalid launcher variables) is an error: the
    answer would be this rank's alone.
    """
    dist = process_group()
    if dist is not None:
        return None if dist.get_world_size() == 1 else dist
    state = rank_state()
    if state.error is not None:
        raise state.error
    if state.world_size > 1:
        raise NoProcessGroupError(
            message(
                f"{op}: no process group on rank {state.rank} of {state.world_size}; the launcher started "
                f"{state.world_size} processes, so a result here would be this rank's alone",
                fix="call ratlib.init_distributed() (or use `with ratlib.distributed():`) on every rank first",
            )
        )
    return None


def _device(dist: Any) -> Any:
    """Where a collective's tensors must live: the current GPU for nccl, else the CPU."""
    import torch

    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_tensor(x: Any) -> TypeGuard[torch.Tensor]:
    torch = sys.modules.get("torch")  # no torch imported: x cannot be a tensor
    return torch is not None and isinstance(x, torch.Tensor)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real)


def _check_rank_arg(name: str, value: int, world: int, fn: str) -> None:
    if not isinstance(value, int) or not 0 <= value < world:
        raise CollectiveArgumentError(
            message(
                f"{fn}: {name}={value!r} is not a rank of this job (world size {world})", expected=f"0..{world - 1}"
            )
        )


@overload
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor: ...
@overload
def all_reduce_mean(x: float) -> float: ...
def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """Mean of ``x`` over all ranks, for metrics: a tensor comes back as a new, detached tensor (integer
    and bool tensors as floating point, as ``t / n`` gives), a Python number as a float."""
    _before_collective("all_reduce_mean")
    dist = _dist("all_reduce_mean")
    world = dist.get_world_size() if dist is not None else 1
    if _is_tensor(x):
        import torch

        t = x.detach().clone()
        if not (t.is_floating_point() or t.is_complex()):
            t = t.to(torch.int64)  # an exact sum; the division below makes it floating point
        if dist is not None:
            home, where = t.device, _device(dist)
            if home != where:  # e.g. a CPU tensor under nccl: reduce on the GPU, hand it back where it was
                t = t.to(where)
            dist.all_reduce(t)
            t = t.to(home)
        return t / world
    if not _is_number(x):
        raise CollectiveTypeError(
            message(
                "all_reduce_mean: cannot reduce this value",
                got=f"{type(x).__name__} ({x!r})",
                expected="a tensor or a real number",
                fix="reduce each value separately, or use reduce_dict for a dict of them",
            )
        )
    if dist is None:
        return float(x)
    import torch

    t = torch.tensor([float(x)], dtype=torch.float64, device=_device(dist))
    dist.all_reduce(t)
    return float(t.item()) / world


def _scalar_values(d: Mapping[str, Any]) -> list[str]:
    """The keys in a fixed order, after checking that every value is a number or a one-element tensor."""
    if not isinstance(d, Mapping):
        raise CollectiveTypeError(
            message(
                "reduce_dict: d is not a dict", got=type(d).__name__, expected="a dict of numbers or scalar tensors"
            )
        )
    for key, value in d.items():
        if not isinstance(key, str):
            raise CollectiveTypeError(
                message(f"reduce_dict: key {key!r} is a {type(key).__name__}", expected="str keys")
            )
        if _is_tensor(value):
            if value.is_complex():
                raise CollectiveTypeError(
                    message(f"reduce_dict: d[{key!r}] is a complex tensor", expected="a real number")
                )
            if value.numel() != 1:
                raise CollectiveArgumentError(
                    message(
                        f"reduce_dict: d[{key!r}] has shape {tuple(value.shape)}",
                        expected="one element",
                        fix="reduce larger tensors with all_reduce_mean",
                    )
                )
        elif not _is_number(value):
            raise CollectiveTypeError(
                message(
                    f"reduce_dict: d[{key!r}] is a {type(value).__name__} ({value!r})",
                    expected="a number or a one-element tensor",
                )
            )
    return sorted(d)


def _check_same_keys(dist: Any, keys: list[str], device: Any) -> None:
    """One small all_reduce (MAX of the count and a key hash, and of their negatives): equal everywhere
    iff every rank passed the same keys. On a mismatch every rank learns it, so all of them raise."""
    import torch

    digest = int.from_bytes(hashlib.blake2b("\0".join(keys).encode(), digest_size=7).digest(), "big")
    t = torch.tensor([len(keys), digest, -len(keys), -digest], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) == -int(t[2]) and int(t[1]) == -int(t[3]):
        return
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, keys)
    shown = "; ".join(f"rank {r}: {k}" for r, k in enumerate(every))
    raise RankMismatchError(
        message(
            "reduce_dict: ranks passed different keys",
            got=shown,
            fix="reduce the same keys on every rank (in any order)",
        )
    )


def reduce_dict(d: Mapping[str, Any], average: bool = True) -> dict[str, Any]:
    """Sum (or mean, with ``average``) of each value over all ranks, in one collective for the values.

    Values are numbers or one-element tensors; every rank must pass the same keys (checked, and a
    mismatch raises ``ValueError`` on every rank instead of mixing values up). Numbers come back as
    floats; tensors as tensors of their own dtype, shape and device (integer tensors as floating
    point for a mean). Keys come back sorted.
    """
    _before_collective("reduce_dict")
    keys = _scalar_values(d)
    dist = _dist("reduce_dict")
    if dist is None:
        return {k: _result(d[k], d[k], average, 1) for k in keys}
    import torch

    device = _device(dist)
    _check_same_keys(dist, keys, device)
    values = torch.stack(
        [
            d[k].detach().to(device=device, dtype=torch.float64).reshape(())
            if _is_tensor(d[k])
            else torch.tensor(float(d[k]), dtype=torch.float64, device=device)
            for k in keys
        ]
    )
    dist.all_reduce(values)
    world = dist.get_world_size()
    return {k: _result(d[k], v, average, world) for k, v in zip(keys, values)}


def _result(src: Any, total: Any, average: bool, world: int) -> Any:
    """``total`` (the sum over ranks) in the type ``src`` came in, divided by ``world`` for a mean."""
    if not _is_tensor(src):
        return float(total) / world if average else float(total)
    import torch

    out = total.detach().to(torch.float64, copy=True)
    if average:
        out = out / world
    integral = not src.is_floating_point()
    dtype = torch.get_default_dtype() if integral and average else src.dtype
    return out.to(dtype=dtype, device=src.device).reshape(src.shape)


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Picklable ``obj`` from every rank, as a list by rank on ``dst``; None on the other ranks."""
    _before_collective("gather_object")
    dist = _dist("gather_object")
    if dist is None:
        _check_rank_arg("dst", dst, 1, "gather_object")
        return [obj]
    _check_rank_arg("dst", dst, dist.get_world_size(), "gather_object")
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj: T) -> list[T]:
    """Picklable ``obj`` from every rank, as a list by rank, on every rank."""
    _before_collective("all_gather_object")
    dist = _dist("all_gather_object")
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``src``'s picklable ``obj`` on every rank (the other ranks' argument is ignored)."""
    _before_collective("broadcast_object")
    dist = _dist("broadcast_object")
    if dist is None:
        _check_rank_arg("src", src, 1, "broadcast_object")
        return obj
    _check_rank_arg("src", src, dist.get_world_size(), "broadcast_object")
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------
# assert_same


_MISSING = "<missing>"


def _plain(value: Any) -> Any:
    """A config model or dataclass as plain data, so that its fields can be compared key by key."""
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic
        return value.model_dump(mode="python")
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    """Leaves of nested dicts / lists by dotted path (``training.optimizer.lr``, ``argv[2]``)."""
    value = _plain(value)
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, (list, tuple)) and value:
        for index, item in enumerate(value):
            _flatten(item, f"{path}[{index}]", out)
    else:
        out[path] = value
    return out


def _ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'; [3] -> 'rank 3'."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def assert_same(value: Any, *, name: str = "config") -> None:
    """Check that every rank holds the same ``value`` (a config, argv, a dataset's length); a collective.

    Otherwise raise ``RankMismatchError`` on every rank, naming the ranks that differ from the majority
    and each (nested) key that differs with its value per rank. Pydantic models and dataclasses are
    compared field by field. World size 1: nothing to compare.
    """
    values = all_gather_object(_plain(value))
    if all(v == values[0] for v in values[1:]):
        return
    flat = [_flatten(v, "", {}) for v in values]
    keys = sorted(set().union(*flat))
    lines = []
    for key in keys:
        by_value: dict[str, list[int]] = {}
        for rank, leaves in enumerate(flat):
            by_value.setdefault(_short_repr(leaves.get(key, _MISSING)), []).append(rank)
        if len(by_value) > 1:
            shown = ", ".join(f"{v} on {_ranks_text(r)}" for v, r in by_value.items())
            lines.append(f"{key or name}: {shown}")
    if not lines:  # equal leaves, different containers or types (1 and 1.0 compare equal, [] and {} do not)
        lines = [f"{name}: " + ", ".join(f"{type(v).__name__} on rank {r}" for r, v in enumerate(values))]
    groups: dict[int, list[int]] = {}
    for rank, v in enumerate(values):
        first = next(r for r in range(rank + 1) if values[r] == v)
        groups.setdefault(first, []).append(rank)
    largest = max(len(g) for g in groups.values())
    majority = [g for g in groups.values() if len(g) == largest]
    odd = sorted(r for g in groups.values() if len(majority) > 1 or g is not majority[0] for r in g)
    raise RankMismatchError(
        message(
            f"{name} differs across ranks: {_ranks_text(odd)} "
            f"{'hold' if len(odd) > 1 else 'holds'} a different {name} than "
            f"{'the others' if len(majority) == 1 else 'each other'}; differing keys: " + "; ".join(lines),
            fix=f"start every rank with the same {name} (the same files, command-line overrides and environment)",
        )
    )


# A store channel: an all-gather through the rendezvous store, whatever state the process group is in


class ChannelError(RatlibError, RuntimeError):
    """A ``StoreChannel`` exchange that could not complete: ranks that never reported (``missing``), or no store
    (``missing`` is None)."""

    def __init__(self, text: str, missing: list[int] | None = None) -> None:
        super().__init__(text)
        self.missing = missing


class StoreChannel:
    """An all-gather of small JSON values through the rendezvous store, which works whatever state the
    process group is in: a rank whose collective failed, or that must report before the group exists or after
    it is broken, still reaches the others. The store is taken from the default group when the channel is made
    (it outlives the group), so make the channel right after ``init_distributed()``. ``namespace`` keeps keys
    apart. With one process (no group) ``all_gather`` is ``[obj]``.
    """

    def __init__(self, namespace: str, *, timeout_s: float = 1800.0, wait_s: float | None = None) -> None:
        self.ns = f"ratlib-channel/{namespace}"
        self.timeout_s = timeout_s
        self.wait_s = wait_s if wait_s is not None else 2 * timeout_s + 60  # a peer may sit out a whole timeout
        self.store: Any = None
        self.rank, self.world_size = 0, 1
        dist = _dist("StoreChannel")
        if dist is not None:
            self.dist, self.backend = dist, dist.get_backend()
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.store = dist.distributed_c10d._get_default_store()

    def all_gather(self, key: str, obj: Any) -> list[Any]:
        """Every rank's JSON-serialisable ``obj`` for ``key`` (use each key once per launch), by rank.
        Raises ``ChannelError`` naming the ranks that did not report within ``wait_s``, or saying that
        the store is gone (its host, the launcher's agent or rank 0, died)."""
        if self.store is None:
            return [obj]
        from datetime import timedelta

        keys = [f"{self.ns}/{key}/{r}" for r in range(self.world_size)]
        try:
            self.store.set(keys[self.rank], json.dumps(obj))
            self.store.wait(keys, timedelta(seconds=self.wait_s))
            return [json.loads(self.store.get(k)) for k in keys]
        except Exception as exc:  # noqa: BLE001 - a timeout, or a store that cannot be reached
            missing = None
            with contextlib.suppress(Exception):
                missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
            if missing is not None:
                raise ChannelError(
                    message(
                        f"StoreChannel {key!r}: rank(s) {missing} did not report within {self.wait_s:.0f} s",
                        fix="those ranks died or hang inside a collective; their logs say where",
                    ),
                    missing,
                ) from exc
            raise ChannelError(
                message(
                    f"StoreChannel {key!r}: the rendezvous store cannot be reached",
                    got=f"{type(exc).__name__}: {str(exc)[:200]}",
                    fix="the launcher (torchrun's agent) or rank 0, which hosts the store, died",
                )
            ) from exc

    def add(self, key: str, amount: int = 1) -> int:
        """An atomic counter in the store (1 for the first rank to call, 2 for the next...); 0 when the
        store cannot be reached, 1 with one process."""
        if self.store is None:
            return amount
        try:
            return int(self.store.add(f"{self.ns}/{key}", amount))
        except Exception:  # noqa: BLE001 - the store is gone: the next all_gather says so
            return 0


# ----------------------------------------------------------------------------------------------
# Buffers


def broadcast_buffers(module: Any, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) into ``module`` on every rank; a no-op with
    one process. DDP broadcasts buffers at the start of each forward, so after the last step every rank
    holds its own: call this before evaluating or saving what every rank must agree on."""
    _before_collective("broadcast_buffers")
    dist = _dist("broadcast_buffers")
    if dist is None:
        return
    _check_rank_arg("src", src, dist.get_world_size(), "broadcast_buffers")
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)

"""Collectives that give the same answer, in the same types, with one process and no group as with many.

Code written against these runs unchanged in a single process (tests, notebooks, debugging) and under
torchrun: each function returns what the collective would return at world size 1 and checks its
arguments the same way, so a mistake shows up before the job is scaled out.

Every public collective starts with ``_before_collective(op)`` so that ``ratlib.hang`` (when imported
and asked to) can check that all ranks are in the same collective from the same call site; that costs
one dictionary lookup when ``ratlib.hang`` is not imported.
"""

from __future__ import annotations

import hashlib
import numbers
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["all_gather_object", "all_reduce_mean", "broadcast_object", "gather_object", "reduce_dict"]

T = TypeVar("T")


def _before_collective(op: str) -> None:
    # Call depth matters: public function -> _before_collective -> hang.before_collective.
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
    """Where a collective's tensors must live: the current GPU for nccl, else the CPU."""
    import torch

    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: x cannot be a tensor
    return torch is not None and isinstance(x, torch.Tensor)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real)


def _check_rank_arg(name: str, value: int, world: int, fn: str) -> None:
    if not isinstance(value, int) or not 0 <= value < world:
        raise ValueError(
            f"{fn}: {name}={value!r} is not a rank of this job (world size {world}); expected 0..{world - 1}"
        )


def all_reduce_mean(x: T) -> T:
    """Mean of ``x`` over all ranks, for metrics: a tensor comes back as a new, detached tensor (integer
    and bool tensors as floating point, as ``t / n`` gives), a Python number as a float."""
    _before_collective("all_reduce_mean")
    dist = _dist()
    world = dist.get_world_size() if dist is not None else 1
    if _is_tensor(x):
        import torch

        t = x.detach().clone()  # type: ignore[attr-defined]
        if not (t.is_floating_point() or t.is_complex()):
            t = t.to(torch.int64)  # an exact sum; the division below makes it floating point
        if dist is not None:
            home, where = t.device, _device(dist)
            if home != where:  # e.g. a CPU tensor under nccl: reduce on the GPU, hand it back where it was
                t = t.to(where)
            dist.all_reduce(t)
            t = t.to(home)
        return t / world  # type: ignore[return-value]
    if not _is_number(x):
        raise TypeError(
            f"all_reduce_mean: expected a tensor or a real number, got {type(x).__name__} ({x!r}); "
            "reduce each value separately, or use reduce_dict for a dict of them"
        )
    if dist is None:
        return float(x)  # type: ignore[arg-type, return-value]
    import torch

    t = torch.tensor([float(x)], dtype=torch.float64, device=_device(dist))  # type: ignore[arg-type]
    dist.all_reduce(t)
    return float(t.item()) / world  # type: ignore[return-value]


def _scalar_values(d: Mapping[str, Any]) -> list[str]:
    """The keys in a fixed order, after checking that every value is a number or a one-element tensor."""
    if not isinstance(d, Mapping):
        raise TypeError(f"reduce_dict: expected a dict of numbers or scalar tensors, got {type(d).__name__}")
    for key, value in d.items():
        if not isinstance(key, str):
            raise TypeError(f"reduce_dict: key {key!r} is a {type(key).__name__}; expected str keys")
        if _is_tensor(value):
            if value.is_complex():
                raise TypeError(f"reduce_dict: d[{key!r}] is a complex tensor; expected a real number")
            if value.numel() != 1:
                raise ValueError(
                    f"reduce_dict: d[{key!r}] has shape {tuple(value.shape)}; expected one element "
                    "(reduce larger tensors with all_reduce_mean)"
                )
        elif not _is_number(value):
            raise TypeError(
                f"reduce_dict: d[{key!r}] is a {type(value).__name__} ({value!r}); expected a number "
                "or a one-element tensor"
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
    raise ValueError(
        f"reduce_dict: ranks passed different keys ({shown}); every rank must reduce the same keys, in any order"
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
    dist = _dist()
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
    dist = _dist()
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
        _check_rank_arg("src", src, 1, "broadcast_object")
        return obj
    _check_rank_arg("src", src, dist.get_world_size(), "broadcast_object")
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------
# A store channel: an all-gather through the rendezvous store, whatever state the process group is in

import contextlib  # noqa: E402 - this section's own imports, kept with it
import json  # noqa: E402

from ratlib.errors import RatlibError, message  # noqa: E402

__all__ += ["ChannelError", "StoreChannel"]


class ChannelError(RatlibError, RuntimeError):
    """A ``StoreChannel`` exchange that could not complete: ranks that never reported, or no store."""


class StoreChannel:
    """An all-gather of small JSON values through the rendezvous store, which works whatever state the
    process group is in, and a fresh default group after a failure.

    Why not a collective: a rank that fails alone leaves the others inside a collective it will never join
    (DDP's broadcast, an all-reduce). It tears its group down instead (``release_peers``); with gloo the
    others' pending collective then fails at once, and every rank meets here to learn how it went. The
    store is taken from the default group when the channel is made (it outlives the groups), so make the
    channel right after ``init_distributed()``. ``namespace`` keeps keys apart: give each launch its own
    (a random nonce the main rank broadcasts). With one process (no group) ``all_gather`` is ``[obj]``.
    """

    def __init__(self, namespace: str, *, timeout_s: float = 1800.0, wait_s: float | None = None) -> None:
        self.ns, self.generation = f"ratlib-channel/{namespace}", 0
        self.timeout_s = timeout_s  # for the groups rebuild_group makes
        self.wait_s = wait_s if wait_s is not None else 2 * timeout_s + 60  # a peer may sit out a whole timeout
        self.store: Any = None
        self.rank, self.world_size = 0, 1
        dist = _dist()
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
                    )
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

    def release_peers(self) -> None:
        """Tear this rank's group down so that peers waiting in a collective for it fail now, not at the
        timeout. Only works if nothing else holds the group: hence a gc pass first (a failed model's cycles)."""
        if self.store is not None and self.dist.is_initialized():
            import gc

            gc.collect()
            self.dist.destroy_process_group()

    def rebuild_group(self) -> None:
        """Every rank, after a failure: a new default group under a new prefix of the same store."""
        if self.store is None:
            return
        self.release_peers()
        self.generation += 1
        from datetime import timedelta

        kwargs: dict[str, Any] = {}
        if self.backend == "nccl":
            import torch

            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        self.dist.init_process_group(
            self.backend,
            store=self.dist.PrefixStore(f"{self.ns}/group{self.generation}/", self.store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=self.timeout_s),
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------
# Buffers and a minimal assert_same


def broadcast_buffers(module: Any, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) into ``module`` on every rank; a no-op with
    one process. DDP broadcasts buffers at the start of each forward, so after the last step every rank
    holds its own: call this before evaluating or saving what every rank must agree on."""
    _before_collective("broadcast_buffers")
    dist = _dist()
    if dist is None:
        return
    _check_rank_arg("src", src, dist.get_world_size(), "broadcast_buffers")
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


__all__ += ["broadcast_buffers"]

if "assert_same" not in globals():  # a stand-in on the examples branch; the full version supersedes it

    def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for k, v in value.items():
                out.update(_flat(v, f"{prefix}{k}."))
            return out
        return {prefix.rstrip("."): value}

    def assert_same(value: Any, *, name: str = "config") -> None:
        """Every rank holds the same ``value``; otherwise a ``RatlibError`` on every rank naming the ranks
        and the keys that differ."""
        every = all_gather_object(value)
        if all(v == every[0] for v in every):
            return
        flats = [_flat(v) for v in every]
        keys = sorted({k for f in flats for k in f if any(f.get(k) != g.get(k) for g in flats)})
        ranks = [r for r, v in enumerate(every) if v != every[0]]
        shown = "; ".join(f"{k}: " + ", ".join(f"rank {r}={f.get(k)!r}" for r, f in enumerate(flats)) for k in keys[:5])
        raise RatlibError(
            message(
                f"{name} differs across ranks: rank(s) {ranks} differ from rank 0",
                got=shown,
                fix="start every rank with the same arguments and overrides",
            )
        )

    __all__ += ["assert_same"]

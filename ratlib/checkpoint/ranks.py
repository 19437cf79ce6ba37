"""The ranks of a sharded save or load: where they meet (the rendezvous store, bounded, naming the ranks that
did not come) and the gloo group that torch.distributed.checkpoint runs its own collectives on, apart from the
training loop's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ratlib.checkpoint._common import CheckpointError, _sync_timeout
from ratlib.errors import message

__all__: list[str] = []


@dataclass
class _Ranks:
    rank: int
    world_size: int
    channel: Any  # ratlib.comm.StoreChannel
    group: Any  # the gloo group for DCP, or None with one process


_GROUP: dict[str, Any] = {}
_SEQ: dict[str, int] = {}


def _ranks(what: str, timeout: float | None) -> _Ranks:
    """This rank, the store channel, and DCP's gloo group (created once per process group, on first use: every
    rank is here, since save and load are called by every rank)."""
    from ratlib.comm import StoreChannel

    channel = StoreChannel("ratlib-checkpoint-sharded", wait_s=_sync_timeout(timeout))
    group = None
    if channel.store is not None or _dist_up():
        import torch.distributed as dist

        default = dist.distributed_c10d._get_default_group()
        if _GROUP.get("default") is not default:
            _GROUP["default"], _GROUP["group"] = default, dist.new_group(backend="gloo")
        group = _GROUP["group"]
    return _Ranks(channel.rank, channel.world_size, channel, group)


def _dist_up() -> bool:
    from ratlib.launch import process_group

    return process_group() is not None


_FIX = (
    "call it on every rank (every rank writes its own shards); if a rank died, its log says why; "
    "raise RATLIB_SYNC_TIMEOUT if a rank is legitimately late"
)


def _meet(
    channel: Any,
    what: str,
    key: str,
    payload: Any,
    call: str,
    *,
    outcome: str = "; nothing was committed",
    got: str | None = None,
    fix: str = _FIX,
) -> list[Any]:
    """Every rank's ``payload`` for this step of ``what``, through the store (a ``ratlib.comm.StoreChannel``),
    at most its ``wait_s``; a ``CheckpointError`` naming the ranks that did not come."""
    from ratlib.comm import ChannelError

    try:
        return channel.all_gather(key, payload)
    except ChannelError as exc:
        missing = exc.missing if exc.missing is not None else "?"
        raise CheckpointError(
            message(
                f"{call} on rank {channel.rank}: rank(s) {missing} of {channel.world_size} did not reach "
                f"{what} within {channel.wait_s:g} s{outcome}",
                got=got,
                fix=fix,
            )
        ) from exc


def _next(what: str) -> int:
    _SEQ[what] = _SEQ.get(what, 0) + 1
    return _SEQ[what]

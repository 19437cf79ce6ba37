"""Asynchronous sharded saves: ``checkpoint.save(state, folder, async_save=True)``.

The call returns once the state is staged: every tensor copied into fresh CPU memory (a DTensor's local shard
keeps its placement), the plain data serialised. A thread then writes the files, meets the other ranks through
the rendezvous store, and the main rank commits and prunes (:func:`ratlib.checkpoint.sharded.write`, the same
protocol as a synchronous save). Rules:

- a change to the model or optimizer after the call never reaches the file (the staged copy is written);
- at most one save is in flight: the next ``save``, ``load``, ``latest`` and interpreter exit wait for it, and so
  can anyone else through :func:`wait_pending` (``Preemption.exit()``, ``shutdown()``);
- the background write uses no collective of the loop's process group: DCP's planning runs on a gloo group of
  its own, created once, and the ranks meet through the store;
- an error in the background write is raised on every rank by the next checkpoint call (or ``wait_pending()``);
- the staged copy is the only extra memory, dropped as soon as DCP has written it.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ratlib.checkpoint._common import CheckpointError
from ratlib.errors import message

__all__ = ["save_in_flight", "stage", "start", "wait_pending"]


class _Pending:
    def __init__(self, call: str, path: Path) -> None:
        self.call, self.path = call, path
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None


_LOCK = threading.Lock()
_PENDING: _Pending | None = None
_ATEXIT = False


def stage(tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """Copies of ``tensors`` in fresh CPU memory (pinned, for CUDA tensors), the DTensors as DTensors."""
    import torch

    staged: dict[str, Any] = {}
    cuda = False
    with torch.no_grad():
        for key, t in tensors.items():
            kind = type(t).__name__
            if kind == "ShardedTensor":
                raise CheckpointError(
                    message(
                        f"checkpoint.save({str(path)!r}, async_save=True): {key!r} is a ShardedTensor (FSDP1), "
                        "which the asynchronous save does not stage",
                        fix="save it synchronously (async_save=False), or move to FSDP2 (DTensor)",
                    )
                )
            local = t._local_tensor if kind == "DTensor" else t
            cuda = cuda or local.is_cuda
            copy = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
            copy.copy_(local.detach(), non_blocking=local.is_cuda)
            if kind == "DTensor":
                copy = type(t)(copy, t._spec, requires_grad=False)
            staged[key] = copy
    if cuda:
        torch.cuda.synchronize()
    return staged


def start(job: Any, write: Callable[[Any], None]) -> None:
    """Run ``write(job)`` in a thread; the staged job becomes the one save in flight."""
    global _PENDING, _ATEXIT
    pending = _Pending(job.call, job.path)

    def run() -> None:
        try:
            write(job)
        except BaseException as exc:  # noqa: BLE001 - kept for the next checkpoint call on this rank
            pending.error = exc

    pending.thread = threading.Thread(target=run, name=f"ratlib-checkpoint-save {job.path.name}", daemon=True)
    with _LOCK:
        if not _ATEXIT:
            from ratlib import dist_init

            atexit.register(_at_exit)
            dist_init.before_shutdown(wait_pending)  # the group outlives the write, its commit included
            _ATEXIT = True
        _PENDING = pending
    pending.thread.start()


def save_in_flight() -> Path | None:
    """The folder of the asynchronous save still being written, or None."""
    pending = _PENDING
    return pending.path if pending is not None and pending.thread is not None and pending.thread.is_alive() else None


def wait_pending() -> None:
    """Wait for the asynchronous save in flight, if any, and raise its error (a :class:`CheckpointError`) if it
    failed. Every checkpoint call does this first; call it before tearing down the process group or exiting by
    other means than a normal interpreter exit (``os._exit``, a requeue)."""
    global _PENDING
    with _LOCK:
        pending, _PENDING = _PENDING, None
    if pending is None or pending.thread is None:
        return
    pending.thread.join()
    error = pending.error
    if error is None:
        return
    if isinstance(error, CheckpointError):
        raise CheckpointError(message(f"the asynchronous {error}")) from error
    raise CheckpointError(
        message(
            f"the asynchronous {pending.call} failed in the background; nothing was committed and the previous "
            "checkpoint is still the latest",
            got=f"{type(error).__name__}: {str(error)[:300]}",
        )
    ) from error


def _at_exit() -> None:
    try:
        wait_pending()
    except CheckpointError as exc:
        print(f"ratlib.checkpoint: {exc}", file=sys.stderr, flush=True)

"""Checkpoints that are right on every rank: written so that a crash leaves the previous one intact, loaded
without running code.

- ``files``: full-state ``.pt`` files (``save``, ``load``, ``latest``, every rank's RNG as plain data), written
  atomically by the main rank. A state holding sharded tensors (FSDP2's DTensor, ShardedTensor) is refused
  there, never written as one rank's copy.
- ``sharded``: checkpoint folders through ``torch.distributed.checkpoint`` (every rank writes its shards; a
  commit marker makes one visible; loads at any world size; async saves).
- ``run``: the run folder's checkpoints as one object (``RunCheckpoints``): save, resume of model, optimiser,
  schedule, sampler, tracker and RNG in one call, prune; what the examples use.
- ``python -m ratlib.checkpoint upgrade FILE`` / ``consolidate DIR OUT.pt``.

torch is imported inside the functions, so ``import ratlib.checkpoint`` stays cheap.
"""

from __future__ import annotations

from ratlib.checkpoint.async_save import save_in_flight, wait_pending
from ratlib.checkpoint.files import (
    CheckpointArgumentError,
    CheckpointError,
    CheckpointNotFoundError,
    latest,
    load,
    rank_entry,
    rng_state,
    save,
    set_rng_state,
    sharded_keys,
    unwrap_model,
    upgrade,
)
from ratlib.checkpoint.run import RunCheckpoints
from ratlib.checkpoint.sharded import consolidate, is_committed

__all__ = [
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "RunCheckpoints",
    "consolidate",
    "is_committed",
    "latest",
    "load",
    "rank_entry",
    "rng_state",
    "save",
    "save_in_flight",
    "set_rng_state",
    "sharded_keys",
    "unwrap_model",
    "upgrade",
    "wait_pending",
]

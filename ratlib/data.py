"""Exact sharding: every sample once per epoch across ranks, nothing padded, the ranks in step.

- ``ShardedBatchSampler``: training batches for one rank (a DataLoader's ``batch_sampler``). Every index
  of an epoch exactly once across all ranks, the same number of batches on every rank (so DDP's
  collectives line up), nothing padded or repeated, resumable mid-epoch from ``state_dict()``.
- ``EvalSampler``: evaluation indices for one rank (a DataLoader's ``sampler``); every index once, no
  padding, also with fewer samples than ranks (a rank may get none).
- ``gather_by_index``: per-sample results keyed by index, gathered on one rank and checked: a missing
  or duplicated index is a ``CoverageError`` naming them, on every rank.

``torch.utils.data.DistributedSampler`` pads the last ranks with repeats so that their lengths are
equal; a metric over its samples counts some twice. These samplers do not, and need no torch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ratlib.errors import RatlibError, message

__all__ = ["CoverageError", "EvalSampler", "ShardedBatchSampler", "ShardingError", "gather_by_index"]


class ShardingError(RatlibError, ValueError):
    """Arguments no exact sharding can satisfy (e.g. fewer training samples than ranks), or a state from
    another sharding."""


class CoverageError(RatlibError, ValueError):
    """Gathered per-sample results that miss indices or hold one twice."""


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The explicit values, or this process's rank and world size (``ratlib.dist_init``)."""
    if rank is None or world_size is None:
        from ratlib.dist_init import get_rank, get_world_size

        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ShardingError(
            message(f"rank {rank} is not a rank of world size {world_size}", expected="0 <= rank < world_size")
        )
    return rank, world_size


def _split_size(n: int, parts: int, i: int) -> int:
    """The size of chunk ``i`` of :func:`_split_even` over ``n`` items."""
    q, r = divmod(n, parts)
    return q + (i < r)


def _split_even(items: list[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive chunks whose sizes differ by at most one (the larger first)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


class ShardedBatchSampler:
    """Training batches for one rank: each epoch, every index in ``range(num_samples)`` exactly once across
    all ranks, and the same number of batches on every rank.

    Each epoch the indices are shuffled by ``(seed, epoch)`` (the same order on every rank) and dealt
    round-robin: rank r takes positions r, r + world_size, ... Its shard (``num_samples // world_size``
    or one more) is cut into ``batches_per_epoch`` consecutive batches whose sizes differ by at most one,
    so step k of all ranks together is the k-th slice of the shuffled order, as one process with a batch
    ``world_size`` times larger would see it. Remainders are handled honestly, never by padding or
    repeating: the ranks' batches at one step may differ in size by one (a mean loss per rank is then
    over one sample more or less), and with ``batch_size=1`` and an uneven split the larger shards hold
    one batch of two. Fewer samples than ranks is a ``ShardingError``: a rank without a batch cannot join
    the step's collectives.

    ``group_ids`` (one per index, e.g. 0 landscape / 1 portrait): within a shard, indices of one group are
    batched together where possible (torchvision's GroupedBatchSampler idea) and the batch order is then
    shuffled. ``augmentation_seeds=True``: items are ``(index, seed)`` pairs, the seed drawn from
    ``(seed, epoch)`` too, so augmentation depends on neither the number of loader workers nor a resume.

    ``state_dict()`` holds the epoch and the position (batches handed out in this epoch);
    ``load_state_dict()`` makes the next iteration of that epoch yield exactly the batches that were left.

    **Global batches** (``global_batch_size=G`` instead of ``batch_size``): step k of an epoch is the k-th slice
    of G samples of the shuffled order (the last one smaller when G does not divide the samples), whatever the
    number of ranks; each rank takes its part of it (round-robin, sizes at most one apart), cut into
    ``accumulation_steps`` micro-batches of at most ``micro_batch_size``. The state is the job's position in
    the epoch (global steps done), the same on every rank, so ``load_state_dict`` continues at any world size
    with the global batches an uninterrupted run would have drawn. Parts differ in size when G is not a
    multiple of the world size: weight each rank's summed loss with :meth:`loss_scale` so that the gradient is
    the mean over the global batch, exactly.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int | None = None,
        *,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        augmentation_seeds: bool = False,
        group_ids: Sequence[int] | None = None,
    ) -> None:
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if (batch_size is None) == (global_batch_size is None):
            raise ShardingError(
                message(
                    "ShardedBatchSampler: give exactly one of batch_size (per rank) and global_batch_size (per step)",
                    got=f"batch_size={batch_size}, global_batch_size={global_batch_size}",
                )
            )
        self.global_batch_size = global_batch_size
        self.accumulation_steps = 1
        if global_batch_size is not None:
            self._check_global(num_samples, global_batch_size, micro_batch_size, group_ids)
            part = -(-global_batch_size // self.world_size)  # the largest part of a full global batch
            self.accumulation_steps = -(-part // micro_batch_size) if micro_batch_size else 1
            batch_size = part
        assert batch_size is not None
        if batch_size < 1:
            raise ShardingError(message(f"batch_size={batch_size}", expected="a batch size of at least 1"))
        if num_samples < self.world_size:
            raise ShardingError(
                message(
                    f"{num_samples} training sample(s) for {self.world_size} ranks: every rank needs at least one",
                    fix="use more samples (e.g. raise data.limit) or fewer ranks",
                )
            )
        if group_ids is not None and len(group_ids) != num_samples:
            raise ShardingError(message(f"{len(group_ids)} group ids for {num_samples} samples", expected="one each"))
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.augmentation_seeds = augmentation_seeds
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.epoch = 0
        self.position = 0  # batches handed out in this epoch
        self._skip = 0  # batches the next iteration leaves out (a restored mid-epoch state)
        self._start = 0  # where the current (or next) iteration starts: len() stays put while it runs

    def _check_global(
        self, num_samples: int, global_batch_size: int, micro_batch_size: int | None, group_ids: Any
    ) -> None:
        if global_batch_size < 1 or (micro_batch_size is not None and micro_batch_size < 1):
            raise ShardingError(
                message(
                    f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size}",
                    expected="whole numbers >= 1",
                )
            )
        if group_ids is not None:
            raise ShardingError(message("group_ids works with batch_size (per rank), not with global_batch_size"))
        part = -(-global_batch_size // self.world_size)
        steps = -(-part // micro_batch_size) if micro_batch_size else 1
        last = num_samples % global_batch_size  # the epoch's last global batch is smaller, unless G divides it
        smallest = min(global_batch_size, num_samples) if last == 0 else last
        if smallest // self.world_size < steps:
            works = [w for w in range(1, self.world_size + 1) if smallest // w >= steps]
            raise ShardingError(
                message(
                    f"a global batch of {smallest} sample(s) (of {num_samples}, global_batch_size={global_batch_size}) "
                    f"cannot give each of {self.world_size} ranks its {steps} micro-batch(es)",
                    fix=f"use at most {max(works) if works else 1} rank(s) here, a global_batch_size that divides "
                    f"{num_samples}, or a larger micro_batch_size",
                )
            )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: global batches, or this rank's batches with a per-rank ``batch_size``."""
        if self.global_batch_size is not None:
            return -(-self.num_samples // self.global_batch_size)
        return self.batches_per_epoch

    def global_size(self, step: int) -> int:
        """Samples in global step ``step`` (0-based) of an epoch, over all ranks."""
        if self.global_batch_size is None:  # the ranks' step-th batches together
            q, r = divmod(self.num_samples, self.world_size)
            return sum(_split_size(q + (rank < r), self.batches_per_epoch, step) for rank in range(self.world_size))
        return min(self.global_batch_size, self.num_samples - step * self.global_batch_size)

    def loss_scale(self, batch_len: int, step: int) -> float:
        """The factor for a rank's *summed* per-sample loss over a (micro-)batch of ``batch_len`` samples at
        global step ``step``, so that DDP's mean over ranks of the gradients is the mean over the global batch:
        ``world_size / global_size(step)``, times ``batch_len`` when applied to a mean loss instead of a sum."""
        return self.world_size * batch_len / self.global_size(step)

    @property
    def batches_per_epoch(self) -> int:
        """Batches (micro-batches, with global batches) this rank yields per epoch."""
        if self.global_batch_size is not None:
            return self.steps_per_epoch * self.accumulation_steps
        smallest, largest = self.num_samples // self.world_size, -(-self.num_samples // self.world_size)
        return min(-(-largest // self.batch_size), smallest)  # never more batches than the smallest shard holds

    def __len__(self) -> int:
        """Batches the current (or next) iteration yields: the whole epoch, or what was left at a restored
        position. Stable from before the iteration to after its end (a loader's workers exhaust the sampler
        a few batches before the loop does); ``set_epoch`` to a new epoch makes it the whole epoch again."""
        return self.batches_per_epoch - self._start

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: the order depends on ``(seed, epoch)``. A restored position applies only
        to the epoch it was saved in."""
        if epoch != self.epoch:
            self.epoch, self.position, self._skip, self._start = epoch, 0, 0, 0

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"ratlib.data/{self.seed}/{self.epoch}")
        order = list(range(self.num_samples))
        if self.shuffle:
            rng.shuffle(order)
        if self.global_batch_size is not None:  # step k: the k-th slice of the order; this rank's part of it
            g = self.global_batch_size
            parts = [order[k * g : (k + 1) * g][self.rank :: self.world_size] for k in range(self.steps_per_epoch)]
            return [micro for part in parts for micro in _split_even(part, self.accumulation_steps)]
        shard = order[self.rank :: self.world_size]
        if self.group_ids is not None:
            shard.sort(key=self.group_ids.__getitem__)  # stable: random order within a group
        batches = _split_even(shard, self.batches_per_epoch)
        if self.group_ids is not None and self.shuffle:
            rng.shuffle(batches)  # the same permutation on every rank: same length per step
        return batches

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        batches = self._batches()
        seeds = None
        if self.augmentation_seeds:
            rng = random.Random(f"ratlib.data/aug/{self.seed}/{self.epoch}")
            seeds = [rng.getrandbits(62) for _ in range(self.num_samples)]
        start, self._skip = self._skip, 0
        self.position = self._start = start
        for batch in batches[start:]:
            self.position += 1
            yield [(i, seeds[i]) for i in batch] if seeds is not None else batch

    def state_dict(self, *, position: int | None = None) -> dict[str, int]:
        """The epoch and the position in it, plus what the sharding depends on (checked on load).

        ``position``: batches consumed in this epoch, when that differs from the batches this sampler
        handed out (a DataLoader with workers fetches a few batches ahead): pass the loop's own count.
        """
        done = self.position if position is None else position
        if self.global_batch_size is not None:  # the job's position: global steps done, the same on every rank
            if done % self.accumulation_steps:
                raise ShardingError(
                    message(
                        f"state_dict(position={done}): not at a step boundary ({self.accumulation_steps} micro-batches "
                        "a step)",
                        fix="take the state after an optimizer step",
                    )
                )
            return {
                "epoch": self.epoch,
                "global_position": done // self.accumulation_steps,
                "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size,
                "world_size": self.world_size,
                "seed": self.seed,
            }
        return {
            "epoch": self.epoch,
            "position": done,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue where ``state`` was taken: the next iteration of ``state["epoch"]`` yields the batches
        after ``state["position"]``. Mid-epoch, the sharding must be the same (samples, batch size, world
        size, seed); at an epoch boundary (position 0, or the whole epoch done) any sharding may resume."""
        if ("global_position" in state) != (self.global_batch_size is not None):
            raise ShardingError(
                message(
                    "a sampler state "
                    + ("with global batches into a per-rank sampler" if "global_position" in state else "with per-rank "
                       "batches into a global-batch sampler"),
                    fix="resume with the batch setting the run was saved with (training.global_batch_size or "
                    "training.batch_size)",
                )
            )  # fmt: skip
        if self.global_batch_size is not None:
            self._load_global(state)
            return
        epoch, position = int(state["epoch"]), int(state["position"])
        if 0 < position < self.batches_per_epoch:
            now = self.state_dict()
            keys = ("num_samples", "batch_size", "world_size", "seed")
            differ = [f"{k} {state.get(k)} (now {now[k]})" for k in keys if state.get(k) != now[k]]
            if differ:
                raise ShardingError(
                    message(
                        f"a sampler state from the middle of epoch {epoch} cannot be continued with another sharding",
                        got=", ".join(differ),
                        fix="resume with the same world size and batch size, or from an end-of-epoch checkpoint",
                    )
                )
        if position >= self.batches_per_epoch:  # the epoch was finished: the next one starts afresh
            self.epoch, self.position, self._skip, self._start = epoch + 1, 0, 0, 0
        else:
            self.epoch, self.position, self._skip, self._start = epoch, position, position, position

    def _load_global(self, state: Mapping[str, int]) -> None:
        """A global position continues at any world size; the data set, seed and global batch must be the same."""
        now = {"num_samples": self.num_samples, "global_batch_size": self.global_batch_size, "seed": self.seed}
        differ = [f"{k} {state.get(k)} (now {v})" for k, v in now.items() if state.get(k) != v]
        if differ:
            raise ShardingError(
                message(
                    f"a sampler state (epoch {state.get('epoch')}) from another data set or batch setting",
                    got=", ".join(differ),
                    fix="resume with the data set, training.seed and training.global_batch_size the run was saved "
                    "with; the number of ranks may change",
                )
            )
        epoch, steps = int(state["epoch"]), int(state["global_position"])
        if steps >= self.steps_per_epoch:  # the epoch was finished: the next one starts afresh
            self.epoch, self.position, self._skip, self._start = epoch + 1, 0, 0, 0
        else:
            done = steps * self.accumulation_steps
            self.epoch, self.position, self._skip, self._start = epoch, done, done, done


class EvalSampler:
    """Evaluation indices for one rank: ``rank, rank + world_size, ...`` below ``num_samples``.

    Every index on exactly one rank, nothing padded, so a metric over the gathered results counts each
    sample once. With fewer samples than ranks some ranks get none; they must still join the collectives
    that follow (``gather_by_index`` does, with an empty dict), so nothing hangs.
    """

    def __init__(self, num_samples: int, *, rank: int | None = None, world_size: int | None = None) -> None:
        if num_samples < 0:
            raise ShardingError(message(f"num_samples={num_samples}", expected="0 or more"))
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def _shown(indices: Sequence[Any], limit: int = 10) -> str:
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return ", ".join(map(str, indices[:limit])) + more


def gather_by_index(results: Mapping[int, Any], num_samples: int, *, dst: int = 0) -> dict[int, Any] | None:
    """Every rank's ``{index: result}`` merged on ``dst`` (sorted by index; None on the other ranks), after
    checking that the indices are exactly ``range(num_samples)``.

    A missing index, one that more than one rank returned, or one outside the range is a
    ``CoverageError`` naming them, raised on every rank (the verdict is broadcast), so no rank waits in
    a later collective for one that failed. Every rank must call it, also with an empty dict.
    """
    from ratlib.comm import broadcast_object, gather_object

    gathered = gather_object(dict(results), dst=dst)
    problem = None
    merged: dict[int, Any] = {}
    if gathered is not None:
        owner: dict[int, int] = {}
        twice: dict[int, list[int]] = {}
        for rank, part in enumerate(gathered):
            for index, value in part.items():
                if index in owner:
                    twice.setdefault(index, [owner[index]]).append(rank)
                else:
                    owner[index] = rank
                    merged[index] = value
        outside = sorted((i for i in owner if not (isinstance(i, int) and 0 <= i < num_samples)), key=str)
        missing = sorted(set(range(num_samples)) - set(owner))
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {num_samples} indices missing ({_shown(missing)})")
        if twice:
            dup = sorted(twice)
            parts.append(
                f"{len(dup)} indices returned by more than one rank ("
                + _shown([f"{i} on ranks {twice[i]}" for i in dup])
                + ")"
            )
        if outside:
            parts.append(f"{len(outside)} indices outside 0..{num_samples - 1} ({_shown(outside)})")
        if parts:
            problem = message(
                "gather_by_index: the ranks' results do not cover the data set exactly once: " + "; ".join(parts),
                fix="give each rank its indices with EvalSampler (no padding) and return one result per index",
            )
    problem = broadcast_object(problem, src=dst)
    if problem is not None:
        raise CoverageError(problem)
    return dict(sorted(merged.items())) if gathered is not None else None

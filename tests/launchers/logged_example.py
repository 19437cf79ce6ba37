"""An example's train.py, run as its command line runs it, with every micro-batch of the training sampler logged:
``python logged_example.py segmentation --config ... key=value ...`` (under torchrun, srun, ...).

For the launcher tests of a resume on another number of ranks (test_resume_other_world_size.py): each rank
appends ``[epoch, global step, [indices]]`` per micro-batch it draws to ``$BATCH_LOG/batches{rank}.{launch}.jsonl``,
``launch`` counting the starts of the job: ``RATLIB_TEST_LAUNCH`` if set, else torchrun's
``TORCHELASTIC_RESTART_COUNT``, else Slurm's ``SLURM_RESTART_COUNT``, else 0. With ``BATCH_GATE=epoch,step``
each rank of launch 0 waits, before it yields that step's micro-batch, until it got a preemption signal: a test
that signals the job then knows at which step it stops, whatever the load. Nothing else changes: the example's
main() runs and its exit code is this process's.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

from ratlib import preempt
from ratlib.data import ShardedBatchSampler

ROOT = Path(__file__).resolve().parents[2]


def launch_number() -> str:
    for name in ("RATLIB_TEST_LAUNCH", "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(name):
            return os.environ[name]
    return "0"


def _wait_for_signal(where: tuple[int, int], timeout: float = 300.0) -> None:
    """Block (in the main thread, where the signal handler runs) until this rank got a preemption signal."""
    deadline = time.monotonic() + timeout
    while not ((p := preempt.current()) is not None and p.requested):
        if time.monotonic() > deadline:
            raise SystemExit(f"logged_example: no preemption signal at {where} within {timeout:g} s")
        time.sleep(0.05)


def log_batches(folder: Path, launch: str, gate: tuple[int, int] | None = None) -> None:
    """Wrap ``ShardedBatchSampler.__iter__``: every batch it yields is appended to this rank's file first."""
    iterate = ShardedBatchSampler.__iter__

    def logged(self):
        with open(folder / f"batches{self.rank}.{launch}.jsonl", "a") as f:
            for batch in iterate(self):
                step = (self.position - 1) // self.accumulation_steps
                indices = [x[0] if isinstance(x, tuple) else x for x in batch]  # (index, augmentation seed) or index
                if gate == (self.epoch, step):
                    _wait_for_signal(gate)
                f.write(json.dumps([self.epoch, step, indices]) + "\n")
                f.flush()
                yield batch

    ShardedBatchSampler.__iter__ = logged


def global_batches(folder: Path, launch: int | str) -> dict[tuple[int, int], list[int]]:
    """(epoch, step) -> the sorted indices of that global step, from every rank's file of one launch."""
    out: dict[tuple[int, int], list[int]] = {}
    for path in sorted(folder.glob(f"batches*.{launch}.jsonl")):
        for line in path.read_text().splitlines():
            epoch, step, indices = json.loads(line)
            out.setdefault((epoch, step), []).extend(indices)
    return {k: sorted(v) for k, v in sorted(out.items())}


def reference_batches(num_samples: int, global_batch_size: int, seed: int, epochs: int) -> dict:
    """(epoch, step) -> sorted indices of an uninterrupted run: one process's sampler, whose global batches are
    those of any number of ranks (tests/test_data.py checks that over many sizes, the example tests on real runs)."""
    sampler = ShardedBatchSampler(num_samples, global_batch_size=global_batch_size, seed=seed, rank=0, world_size=1)
    out = {}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step, batch in enumerate(sampler):
            out[(epoch, step)] = sorted(x[0] if isinstance(x, tuple) else x for x in batch)
    return out


if __name__ == "__main__":
    example, argv = sys.argv[1], sys.argv[2:]
    launch, gate = launch_number(), os.environ.get("BATCH_GATE")
    where = tuple(int(x) for x in gate.split(",")) if gate and launch == "0" else None
    log_batches(Path(os.environ["BATCH_LOG"]), launch, where)  # type: ignore[arg-type]
    script = ROOT / "examples" / example / "train.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")

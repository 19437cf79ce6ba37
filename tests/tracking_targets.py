"""What the tracking tests run in other processes: a 2-rank job (``run_on_ranks``) and a small training
script (``python tests/tracking_targets.py train ...``) that a test kills with SIGKILL and then resumes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def two_ranks(base: str) -> int:
    """Every rank makes a Tracker on the shared run folder and on a folder of its own, and logs."""
    from ratlib.dist_init import barrier, distributed, get_rank
    from ratlib.memory import memory_report
    from ratlib.tracking import Tracker, memory_metrics

    with distributed(backend="gloo", device="cpu"):
        rank = get_rank()
        report = memory_report("cpu", warn_fraction=None)  # a collective: every rank calls it

        def track() -> None:
            config = {"training": {"lr": 0.01, "batch_size": 4}}
            with Tracker(Path(base) / "run", config=config) as tracker, Tracker(Path(base) / f"own-rank{rank}") as own:
                for step in range(5):
                    metrics = {"loss": 1.0 / (step + 1), **memory_metrics(report)}
                    tracker.log(metrics, step)
                    own.log(metrics, step)
            print(f"rank {rank} tracked", flush=True)

        # Rank 1 tracks while rank 0 waits in a barrier: a collective inside rank 1's tracker would pair with
        # rank 0's barrier and fail or hang the job.
        if rank != 0:
            track()
        barrier()
        if rank == 0:
            track()
    return 0


def train(run_dir: str, state_path: str, first: int, last: int, every: int, pause_at: int, attempt: int) -> None:
    """Log ``loss = attempt * 1000 + step`` for steps first..last; keep the tracker state every ``every``
    steps in ``state_path`` (the checkpoint); at ``pause_at``, flush, say so and wait to be killed."""
    from ratlib.io import write_atomic
    from ratlib.tracking import Tracker

    resume = json.loads(Path(state_path).read_text()) if first > 0 else False
    tracker = Tracker(run_dir, resume=resume)
    for step in range(first, last + 1):
        tracker.log({"loss": float(attempt * 1000 + step)}, step)
        if step % every == 0:
            write_atomic(state_path, json.dumps(tracker.state_dict()))
        if step == pause_at:
            tracker.flush(timeout=120)
            print(f"FLUSHED {step}", flush=True)
            time.sleep(600)
    tracker.close(timeout=120)
    print("DONE", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        run_dir, state_path, *numbers = sys.argv[2:]
        train(run_dir, state_path, *map(int, numbers))

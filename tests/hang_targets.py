"""Functions run on several ranks by tests/test_hang.py. Lines tagged ``# <MARKER>`` are looked up by the tests."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from ratlib import comm, dist_init, hang
from ratlib.rank_logger import setup_logging


def uneven_last_batch(log_dir: str, odd: int, stall_timeout: float) -> int:
    """The odd rank's data shard is one batch short: it skips the last step's all_reduce and goes on to
    save its predictions, while the other ranks wait for it in that all_reduce."""
    setup_logging("INFO", log_dir=log_dir)
    info = dist_init.init_distributed(stall_timeout=stall_timeout, connect_timeout=30)
    batches = 3 if info.rank == odd else 4
    for step in range(batches):
        hang.heartbeat(step)
        print(f"BEAT {step} {time.time()}", flush=True)
        loss = torch.tensor(float(step + info.rank))
        comm.all_reduce_mean(loss)  # <ALL_REDUCE>
    save_predictions()
    return 0


def save_predictions() -> None:
    time.sleep(120)  # <SAVE>


def signal_while_blocked(log_dir: str) -> int:
    """Rank 0 sends SIGUSR2 to rank 1 while rank 1 is blocked in an all_reduce; the job goes on."""
    setup_logging("INFO", log_dir=log_dir)
    info = dist_init.init_distributed(connect_timeout=30)
    hang.install()  # SIGUSR2 (the default), no watchdog
    pids = comm.all_gather_object(os.getpid())
    total = 0.0
    for step in range(3):
        hang.heartbeat(step)
        if info.rank == 0 and step == 1:
            time.sleep(1.0)  # rank 1 is blocked in the all_reduce below by now
            os.kill(pids[1], signal.SIGUSR2)
            time.sleep(1.0)
        total = comm.all_reduce_mean(float(step))  # <BLOCKED>
    assert total == 2.0, total
    dist_init.shutdown()
    print(f"DONE rank {info.rank}", flush=True)
    return 0


def mismatched_collectives(kind: str) -> int:
    """Two agreeing collectives, then ranks that disagree: a different operation, or a skipped step."""
    setup_logging("INFO")
    info = dist_init.init_distributed(connect_timeout=30, check_collectives=True)
    for step in range(2):
        hang.heartbeat(step)
        assert comm.all_reduce_mean(1.0) == 1.0
    try:
        if kind == "op":
            hang.heartbeat(2)
            if info.rank == 1:
                comm.broadcast_object("x")  # <BROADCAST>
            else:
                comm.all_reduce_mean(1.0)  # <OP_ALL_REDUCE>
        else:
            for step in range(2, 4):
                hang.heartbeat(step)
                if info.rank == 1 and step == 2:
                    continue  # rank 1 skips one all_reduce
                comm.all_reduce_mean(1.0)  # <SKIP_ALL_REDUCE>
    except hang.CollectiveMismatchError as exc:
        print(f"MISMATCH {type(exc).__name__}: {exc}", flush=True)
        sys.stdout.flush()
        return 3
    print("NO MISMATCH", flush=True)
    return 0

"""Module-level functions that tests run on several ranks through ``run_on_ranks``."""

from __future__ import annotations

import os
import time


def all_reduce_rank_sum(expected_world_size: int) -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        assert dist.get_world_size() == expected_world_size
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        print(f"rank {dist.get_rank()} sum {int(t.item())}", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def hang_on_rank(hang_rank: int) -> int:
    rank = int(os.environ["RANK"])
    print(f"rank {rank} started", flush=True)
    if rank == hang_rank:
        time.sleep(3600)
    return 0


def exit_with(code_by_rank: dict[int, int]) -> int:
    return code_by_rank.get(int(os.environ["RANK"]), 0)

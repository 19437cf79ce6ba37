"""Functions run on several ranks by tests/test_dist_init.py and tests/test_comm.py."""

from __future__ import annotations

import os
import time

import torch

from ratlib import comm, dist_init
from ratlib.rank_logger import setup_logging


def full_cycle(expected_launcher: str) -> int:
    """init, DistInfo, every collective, main_process_first, idempotence, teardown."""
    setup_logging("INFO")
    with dist_init.distributed(connect_timeout=30) as info:
        assert info.launcher == expected_launcher, info
        r, w = info.rank, info.world_size
        assert info.backend == "gloo" and info.device == torch.device("cpu") and info.is_distributed
        assert dist_init.init_distributed(connect_timeout=30) is info  # idempotent
        assert dist_init.get_rank() == r and dist_init.get_world_size() == w
        assert comm.all_reduce_mean(float(r)) == sum(range(w)) / w
        t = comm.all_reduce_mean(torch.tensor([r, 2 * r]))
        assert torch.allclose(t, torch.tensor([sum(range(w)) / w, 2 * sum(range(w)) / w], dtype=t.dtype))
        d = comm.reduce_dict({"a": torch.tensor(float(r)), "b": 1.0}, average=False)
        assert d["a"].item() == sum(range(w)) and d["b"] == float(w)
        gathered = comm.gather_object({"rank": r}, dst=0)
        assert gathered == ([{"rank": i} for i in range(w)] if r == 0 else None)
        assert comm.all_gather_object(r * 10) == [i * 10 for i in range(w)]
        assert comm.broadcast_object("from-main" if r == 0 else None) == "from-main"
        marker = os.environ["MARKER_DIR"]
        with dist_init.main_process_first():
            if r == 0:
                time.sleep(0.5)
                open(os.path.join(marker, "prepared"), "w").close()
            else:
                assert os.path.exists(os.path.join(marker, "prepared")), "ran before the main rank"
        print(f"OK rank={r} world={w} local={info.local_rank}/{info.local_world_size} node={info.node_rank}")
    assert not torch.distributed.is_initialized()
    return 0


def raise_on_rank(bad_rank: int) -> int:
    setup_logging("INFO")
    with dist_init.distributed(timeout=20, connect_timeout=20) as info:
        if info.rank == bad_rank:
            raise ValueError(f"bad batch on rank {info.rank}")
        comm.all_reduce_mean(1.0)  # the others wait here for the rank that raised
        comm.all_reduce_mean(1.0)
    return 0


def init_only() -> int:
    dist_init.init_distributed(connect_timeout=30)
    dist_init.shutdown()
    return 0

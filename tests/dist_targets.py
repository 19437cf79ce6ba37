"""Functions run on several real ranks by tests/test_dist_init.py and tests/test_comm.py.

Torch is imported inside the functions, so that collecting the tests stays cheap. Also runnable as a
script (``python -m torch.distributed.run ... tests/dist_targets.py full_cycle torchrun``).
"""

from __future__ import annotations

import atexit
import os
import sys
import time

from ratlib import comm, dist_init
from ratlib.rank_logger import setup_logging


def _check_collectives(rank: int, world: int) -> None:
    import torch

    assert comm.all_reduce_mean(float(rank)) == sum(range(world)) / world
    t = comm.all_reduce_mean(torch.tensor([rank, 2 * rank]))
    assert t.dtype == torch.float32 and torch.equal(t, torch.tensor([1.0, 2.0]) * sum(range(world)) / world), t
    d = comm.reduce_dict({"b": 1.0, "a": torch.tensor(float(rank))}, average=False)
    assert list(d) == ["a", "b"] and d["a"].item() == sum(range(world)) and d["b"] == float(world), d
    gathered = comm.gather_object({"rank": rank}, dst=0)
    assert gathered == ([{"rank": i} for i in range(world)] if rank == 0 else None), gathered
    assert comm.all_gather_object(rank * 10) == [i * 10 for i in range(world)]
    assert comm.broadcast_object("from-main" if rank == 0 else None) == "from-main"


def full_cycle(expected_launcher: str) -> int:
    """init, DistInfo, every collective, main_process_first, idempotence, teardown by the context manager."""
    import torch

    setup_logging("INFO")
    with dist_init.distributed(connect_timeout=60) as info:
        assert info.launcher == expected_launcher, info
        r, w = info.rank, info.world_size
        assert info.backend == "gloo" and info.device == torch.device("cpu") and info.is_distributed, info
        assert info.is_main == (r == 0) and info.master_port is not None
        assert dist_init.init_distributed(connect_timeout=60) is info  # idempotent
        assert (dist_init.get_rank(), dist_init.get_world_size(), dist_init.is_main_process()) == (r, w, r == 0)
        _check_collectives(r, w)
        marker = os.path.join(os.environ["MARKER_DIR"], "prepared")
        with dist_init.main_process_first():
            if r == 0:
                time.sleep(0.5)
                open(marker, "w").close()
            else:
                assert os.path.exists(marker), "a non-main rank ran the block before the main rank finished it"
        dist_init.barrier()
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "unset")
        print(
            f"OK rank={r} world={w} local={info.local_rank}/{info.local_world_size} node={info.node_rank} "
            f"agent_store={agent}",
            flush=True,
        )
    assert not torch.distributed.is_initialized()
    assert dist_init.get_rank() == r  # after teardown, from the launcher again
    return 0


def _report_teardown() -> None:
    import torch.distributed as dist

    print(f"AT EXIT group_initialized={dist.is_initialized()}", flush=True)


def init_and_leave_to_atexit(expected_launcher: str) -> int:
    """init_distributed without the context manager: the group must still be destroyed at exit."""
    atexit.register(_report_teardown)  # registered first, so it runs after ratlib's own exit hook
    info = dist_init.init_distributed(connect_timeout=60)
    assert info.launcher == expected_launcher and info.is_distributed, info
    _check_collectives(info.rank, info.world_size)
    print(
        f"OK rank={info.rank} world={info.world_size} local={info.local_rank}/{info.local_world_size} "
        f"master={info.master_addr}:{info.master_port}",
        flush=True,
    )
    return 0


def raise_on_rank(bad_rank: int) -> int:
    setup_logging("INFO")
    with dist_init.distributed(timeout=30, connect_timeout=60) as info:
        if info.rank == bad_rank:
            raise ValueError(f"bad batch on rank {info.rank}")
        comm.all_reduce_mean(1.0)  # the others wait here for the rank that raised
        comm.all_reduce_mean(1.0)
    return 0


def ratlib_error_inside_distributed(log_dir: str) -> int:
    """A user's loop with a wrong data path: an uncaught CocoPathError inside distributed() on every rank.
    ``log_dir`` "": no log files."""
    from ratlib.coco_paths import resolve_coco

    setup_logging("INFO", log_dir=log_dir or None)
    with dist_init.distributed(device="cpu", connect_timeout=60):
        resolve_coco("/nonexistent/ratlib-no-such-coco", "val")
    return 0


def comm_edge_cases() -> int:
    """Types, argument checks and a key mismatch that must raise on every rank, not hang or mix values."""
    import torch

    info = dist_init.init_distributed(connect_timeout=60)
    r, w = info.rank, info.world_size
    half = comm.reduce_dict(
        {"n": torch.tensor([r], dtype=torch.int32), "x": torch.tensor(2.0 * r, dtype=torch.bfloat16)}
    )
    assert half["n"].dtype == torch.float32 and half["n"].shape == (1,) and half["n"].item() == sum(range(w)) / w
    assert half["x"].dtype == torch.bfloat16 and half["x"].item() == 2.0 * sum(range(w)) / w, half
    total = comm.reduce_dict({"n": torch.tensor(r + 1)}, average=False)
    assert total["n"].dtype == torch.int64 and total["n"].item() == w * (w + 1) // 2, total
    assert comm.all_reduce_mean(torch.tensor([True, False]) if r == 0 else torch.tensor([True, True])).tolist() == [
        1.0,
        0.5 if w == 2 else (w - 1) / w,
    ]
    assert comm.gather_object(r, dst=w - 1) == (list(range(w)) if r == w - 1 else None)
    assert comm.broadcast_object(f"from {r}", src=w - 1) == f"from {w - 1}"
    for call in (lambda: comm.gather_object(r, dst=w), lambda: comm.broadcast_object(r, src=-1)):
        try:
            call()
        except ValueError as exc:
            assert "is not a rank of this job" in str(exc), exc
        else:
            raise AssertionError("a rank outside the job was accepted")
    keys = {"loss": 1.0, "acc": 0.5} if r == 0 else {"loss": 1.0, "accuracy": 0.5}
    try:
        comm.reduce_dict(keys)
    except ValueError as exc:
        assert "ranks passed different keys" in str(exc) and "accuracy" in str(exc), exc
    else:
        raise AssertionError("reduce_dict accepted different keys on different ranks")
    assert comm.all_reduce_mean(3) == 3.0  # the group still works after the mismatch
    print(f"OK rank={r} launcher={info.launcher} local={info.local_rank}/{info.local_world_size}", flush=True)
    dist_init.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(globals()[sys.argv[1]](*sys.argv[2:]))


def collectives_without_a_group() -> int:
    """Launcher world size 2, no init_distributed: every collective refuses, naming the fix."""
    from ratlib import comm
    from ratlib.errors import RatlibError
    from ratlib.launch import get_world_size

    assert get_world_size() == 2  # the launcher's count, documented
    calls = {
        "all_reduce_mean": lambda: comm.all_reduce_mean(1.0),
        "reduce_dict": lambda: comm.reduce_dict({"loss": 1.0}),
        "gather_object": lambda: comm.gather_object(1),
        "all_gather_object": lambda: comm.all_gather_object(1),
        "broadcast_object": lambda: comm.broadcast_object(1),
        "assert_same": lambda: comm.assert_same({"a": 1}),
    }
    for name, call in calls.items():
        try:
            call()
        except comm.NoProcessGroupError as exc:
            assert isinstance(exc, RatlibError) and isinstance(exc, RuntimeError)
            print(f"REFUSED {name}: {exc}", flush=True)
        else:
            print(f"ANSWERED {name}", flush=True)
    return 0


def assert_same_config(odd_rank: int) -> int:
    """A nested config that differs on ``odd_rank`` in one key: RankMismatchError on every rank."""
    import os

    from ratlib import comm
    from ratlib.dist_init import distributed

    with distributed(device="cpu", backend="gloo"):
        rank = int(os.environ["RANK"])
        config = {"training": {"optimizer": {"lr": 0.001, "name": "adamw"}, "batch_size": 8}, "seed": 0}
        comm.assert_same(config)  # all equal: passes
        comm.assert_same(len("same"), name="dataset length")
        if rank == odd_rank:
            config["training"]["optimizer"]["lr"] = 0.01
        try:
            comm.assert_same(config)
        except comm.RankMismatchError as exc:
            print(f"MISMATCH {exc}", flush=True)
        else:
            print("NO MISMATCH", flush=True)
    return 0

"""ratlib.comm.StoreChannel: an all-gather through the store that works with a broken process group."""

from __future__ import annotations

import pytest

from ratlib.comm import ChannelError, StoreChannel
from ratlib.testing import run_on_ranks


def test_channel_without_a_group_is_world_size_one() -> None:
    channel = StoreChannel("t")
    assert channel.all_gather("k", {"a": 1}) == [{"a": 1}] and channel.add("n") == 1


def channel_survives_a_torn_down_group() -> int:
    """Rank 1 tears its group down while rank 0 waits in an all_reduce for it (gloo fails that at once); both
    then still meet in the channel, which needs only the store."""
    import torch
    import torch.distributed as dist

    from ratlib import dist_init

    info = dist_init.init_distributed(device="cpu", timeout=60)
    channel = StoreChannel("test", timeout_s=60, wait_s=60)
    assert channel.all_gather("hello", info.rank * 10) == [0, 10]
    failed = None
    if info.rank == 1:
        failed = "raised"
        assert channel.add("failures") == 1  # the first rank to fail
        dist.destroy_process_group()
    else:
        try:
            dist.all_reduce(torch.ones(1))  # its peer is gone: gloo fails this at once
        except Exception as exc:  # noqa: BLE001
            failed = f"collective: {type(exc).__name__}"
    outcomes = channel.all_gather("outcome", failed)
    assert outcomes[1] == "raised" and outcomes[0] is not None, outcomes
    print(f"rank {info.rank} OK {outcomes}", flush=True)
    dist_init.shutdown()
    return 0


def channel_names_a_rank_that_never_reports() -> int:
    from ratlib import dist_init

    info = dist_init.init_distributed(device="cpu", timeout=60)
    channel = StoreChannel("test", timeout_s=60, wait_s=3)
    if info.rank == 1:
        import time

        time.sleep(8)  # never reports in time
        return 0
    try:
        channel.all_gather("late", 1)
    except ChannelError as exc:
        print(f"ChannelError: {exc}", flush=True)
        return 0
    return 1


@pytest.mark.distributed
def test_channel_all_gathers_after_a_rank_tore_its_group_down() -> None:
    run = run_on_ranks(channel_survives_a_torn_down_group, 2, timeout=120).check()
    assert all(f"rank {r} OK" in run.stdouts[r] for r in range(2)), run.stdouts


@pytest.mark.distributed
def test_channel_names_the_ranks_that_did_not_report() -> None:
    run = run_on_ranks(channel_names_a_rank_that_never_reports, 2, timeout=120)
    assert run.returncodes[0] == 0, str(run)
    assert "StoreChannel 'late': rank(s) [1] did not report within 3 s" in run.stdouts[0]

"""mean_metric on two real ranks, and eval_shard against every launcher environment."""

from __future__ import annotations

import re

import pytest
import rank_workers
from downstream_proj import eval_shard, mean_metric
from hypothesis import given, settings

from ratlib import DistInitError
from ratlib.testing.strategies import launch_envs


@pytest.mark.distributed
def test_mean_metric_on_two_ranks_weighs_every_value_once(run_on_ranks) -> None:
    # 5 items on 2 ranks: rank 0 scores items 0, 2, 4 (0, 4, 16), rank 1 items 1, 3 (1, 9)
    run = run_on_ranks(rank_workers.score_shard, world_size=2, args=(5,), timeout=120).check()
    lines = [re.search(r"rank=(\d) count=(\d) local_mean=(\S+) mean=(\S+)", out) for out in run.stdouts]
    assert all(lines), run
    counts = [int(m.group(2)) for m in lines]
    means = [float(m.group(4)) for m in lines]
    assert counts == [3, 2]
    assert means == [6.0, 6.0]  # (0 + 4 + 16 + 1 + 9) / 5, the same on both ranks
    mean_of_means = sum(float(m.group(3)) for m in lines) / 2  # the mistake mean_metric avoids: 5.83
    assert mean_of_means != pytest.approx(6.0)


def test_mean_metric_without_a_group_is_the_plain_mean() -> None:
    assert mean_metric([1, 2, 3, 10]) == 4.0
    with pytest.raises(ValueError, match="no values"):
        mean_metric([])


@settings(deadline=None)
@given(launch_envs())
def test_eval_shard_follows_the_launcher(case) -> None:
    shard = eval_shard(10, case.environ)
    assert shard == range(case.rank, 10, case.world_size), case.environ


@settings(deadline=None)
@given(launch_envs(valid=False))
def test_eval_shard_refuses_a_broken_launch_environment(case) -> None:
    with pytest.raises(DistInitError) as info:  # the launcher's mistake, named; never a wrong shard
        eval_shard(10, case.environ)
    assert case.bad_variable in str(info.value).partition(". Got: ")[0], (case.note, str(info.value))

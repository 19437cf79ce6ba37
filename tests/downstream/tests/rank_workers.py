"""Functions that tests/test_metrics.py runs on every rank (``run_on_ranks`` imports them by name)."""

from __future__ import annotations

from downstream_proj import eval_shard, mean_metric

import ratlib


def score_shard(num_items: int) -> None:
    """Score this rank's shard of ``num_items`` items (item i scores i*i) and print the reduced mean."""
    with ratlib.distributed(backend="gloo", connect_timeout=30):
        shard = eval_shard(num_items)
        scores = [float(i * i) for i in shard]
        print(
            f"rank={ratlib.get_rank()} count={len(scores)} local_mean={sum(scores) / len(scores)!r} "
            f"mean={mean_metric(scores)!r}"
        )

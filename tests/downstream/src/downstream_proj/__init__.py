"""downstream_proj: a sample project built on ratlib (the sample that ``docs/testing.md`` points to).

- :func:`resolve_annotations`: the project's own COCO annotation path, from any spelling of a split.
- :func:`eval_shard`: the part of an evaluation set this rank scores.
- :func:`mean_metric`: a metric's mean over every rank's values.
- :func:`resolve_annotations_doubled_year`: a deliberately broken resolver, for ratlib's test that the
  property test catches it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ratlib import detect_launch_env, parse_split, reduce_dict
from ratlib.coco_paths import CocoSplit

__all__ = ["eval_shard", "mean_metric", "resolve_annotations", "resolve_annotations_doubled_year"]


def _checked(root: Path, split: CocoSplit, path: Path) -> Path:
    if split.is_test or split.name == "unlabeled":
        raise ValueError(
            f"{split} has no labels, so no instances file; this project trains and evaluates on "
            "train, val, minival or valminusminival"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{split}: annotation file {path} does not exist (COCO root {root})")
    return path


def resolve_annotations(root: str | os.PathLike[str], split: str | CocoSplit) -> Path:
    """``root/annotations/instances_{split}{year}.json`` for any spelling of ``split``.

    ``split`` may be ``train``, ``train2017``, ``2017_train``, ``instances_train2017.json``, ... :
    ``ratlib.parse_split`` turns each into one ``CocoSplit`` whose ``str()`` is ``train2017``, so the
    year appears exactly once. Raises ``ValueError`` for an unknown or unlabelled split and
    ``FileNotFoundError`` when the file is missing.
    """
    s = parse_split(split)
    return _checked(Path(root), s, Path(root) / "annotations" / f"instances_{s}.json")


def resolve_annotations_doubled_year(root: str | os.PathLike[str], split: str | CocoSplit) -> Path:
    """DELIBERATELY BROKEN: ``resolve_annotations`` with the doubled-year f-string bug.

    Written as if ``split`` were still the bare name, while it already carries the year:
    ``train2017`` becomes ``instances_train20172017.json``. Kept so that ratlib's suite can check that
    the property test in ``tests/test_paths.py`` catches it (``DOWNSTREAM_RESOLVER=doubled_year``).
    """
    s = parse_split(split)
    return _checked(Path(root), s, Path(root) / f"annotations/instances_{s}2017.json")


def eval_shard(num_items: int, environ: Mapping[str, str] | None = None) -> range:
    """The indices of an ``num_items``-long evaluation set that this rank scores: every
    ``world_size``-th item from its rank, as read from the launcher's variables (``environ``, default
    ``os.environ``). Shards differ in size by one when ``world_size`` does not divide ``num_items``."""
    launch = detect_launch_env(environ)
    return range(launch.rank, num_items, launch.world_size)


def mean_metric(values: Iterable[float]) -> float:
    """The mean of every rank's ``values`` together, the same on every rank.

    Sum and count are all-reduced (one ``ratlib.reduce_dict``) and then divided. Averaging each rank's
    mean instead would weigh a rank with 2 values like one with 3, and give a different number whenever
    the shards are uneven. Works unchanged in a single process (no group): the plain mean.
    """
    vals = [float(v) for v in values]
    totals = reduce_dict({"count": len(vals), "sum": math.fsum(vals)}, average=False)
    if totals["count"] == 0:
        raise ValueError("mean_metric: no values on any rank")
    return totals["sum"] / totals["count"]

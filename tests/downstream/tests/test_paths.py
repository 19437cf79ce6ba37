"""The project's COCO resolver against every spelling ratlib accepts, on generated COCO trees.

``DOWNSTREAM_RESOLVER=doubled_year`` runs the same property against the deliberately broken resolver
(ratlib's tests/test_downstream.py checks that hypothesis catches it).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import downstream_proj
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratlib.testing.strategies import coco_split_spellings, coco_trees

resolve = (
    downstream_proj.resolve_annotations_doubled_year
    if os.environ.get("DOWNSTREAM_RESOLVER") == "doubled_year"
    else downstream_proj.resolve_annotations
)


# Building a strategy costs more than drawing from it: one per split, made on first use.
spellings_of = functools.cache(coco_split_spellings)


def _outcome(root: Path, spelling: str) -> Path | str:
    """The path resolved, or the error raised as ``"TypeName: message"``."""
    try:
        return resolve(root, spelling)
    except (ValueError, FileNotFoundError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _kind(outcome: Path | str) -> Path | str:
    return outcome if isinstance(outcome, Path) else outcome.partition(":")[0]


# deadline=None: each example writes a small tree to disk, which a busy CI machine may make slow
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=coco_trees(layout="coco"), data=st.data())
def test_every_spelling_of_a_split_resolves_to_the_same_file(tree, data) -> None:
    a, split = data.draw(spellings_of(tree.split), label="spelling a")
    b, _ = data.draw(spellings_of(tree.split), label="spelling b")
    want = f"annotations/instances_{split}.json"
    if split.is_test or split.name == "unlabeled":
        expected: Path | str = "ValueError"  # no labels, no instances file
    else:  # a missing file is an error: decoys (other years, instances_train20172017.json) must not stand in
        expected = tree.root / want if want in tree.files else "FileNotFoundError"
    got_a, got_b = _outcome(tree.root, a), _outcome(tree.root, b)
    assert _kind(got_a) == _kind(got_b) == expected, f"{a!r} -> {got_a}\n{b!r} -> {got_b}\nexpected {expected}"


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="tain"):
        resolve("/data/coco", "tain2017")

"""Preemption and exact resume in a training loop split into functions (tests/split_loop_targets.py): the
pattern docs/preemption.md and docs/checkpoint.md give, on 2 real gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import split_loop_targets

from ratlib.testing import run_on_ranks


def _result(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.distributed
@pytest.mark.slow  # three 2-rank runs
@pytest.mark.needs_torch("2.6", "MultiStepLR's state holds a Counter, which older weights_only loads refuse")
def test_a_loop_split_into_functions_stops_mid_warmup_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    (tmp_path / "whole").mkdir()
    (tmp_path / "stopped").mkdir()
    whole = run_on_ranks(split_loop_targets.main, 2, args=(str(tmp_path / "whole"), "-1"), timeout=120).check()
    # SIGTERM to rank 1 after step 3 of 8 in epoch 0, inside the warmup: both ranks stop at one step, exit 75
    stopped = run_on_ranks(split_loop_targets.main, 2, args=(str(tmp_path / "stopped"), "3"), timeout=120)
    assert stopped.returncodes == [75, 75], stopped
    resumed = run_on_ranks(split_loop_targets.main, 2, args=(str(tmp_path / "stopped"), "-1"), timeout=120).check()
    expected = _result(whole.stdouts[0])
    assert expected["step"] == split_loop_targets.EPOCHS * 8
    for r in range(2):
        assert _result(resumed.stdouts[r]) == expected  # weights bit for bit, the step counter, the lr per epoch


@pytest.mark.distributed
@pytest.mark.slow  # two stop-and-resume runs of 2 ranks
@pytest.mark.parametrize("skip", ["lr", "generator"])
def test_each_documented_step_is_needed(tmp_path: Path, skip: str) -> None:
    """Without the lr set again after the warmup's state, or without the loader's own generator, the resumed
    run ends elsewhere: the steps the docs give are each needed."""
    for name in ("whole", "stopped"):
        (tmp_path / name).mkdir()
    whole = run_on_ranks(split_loop_targets.main, 2, args=(str(tmp_path / "whole"), "-1", skip), timeout=120).check()
    stopped = run_on_ranks(split_loop_targets.main, 2, args=(str(tmp_path / "stopped"), "3", skip), timeout=120)
    assert stopped.returncodes == [75, 75], stopped
    resumed = run_on_ranks(split_loop_targets.main, 2, args=(str(tmp_path / "stopped"), "-1", skip), timeout=120)
    assert _result(resumed.check().stdouts[0])["digest"] != _result(whole.stdouts[0])["digest"]

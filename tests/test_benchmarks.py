"""Every script in benchmarks/ runs with tiny settings and prints its ratios, so none can rot unseen (the example
benchmarks once stopped with a TypeError for weeks). No timing threshold: the figures are for people to read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# script -> the tiny settings of its smoke run
TINY = {
    "bench_checkpoint.py": ["--quick"],
    "bench_detection.py": ["--images", "8", "--steps", "2", "--warmup", "1", "--rounds", "2", "--batch-size", "2"]
    + ["--image-size", "64"],
    "bench_dist_init.py": ["--repeats", "1"],
    "bench_hang.py": ["--repeats", "1", "--calls", "1000", "--steps", "5", "--collectives", "5"],
    "bench_logging.py": ["--repeats", "1", "--calls", "1000"],
    "bench_numerics.py": ["--repeats", "1", "--steps", "2", "--size", "32", "--drift-calls", "1"]
    + ["--check-calls", "10"],
    "bench_preempt.py": ["--repeats", "1", "--steps", "3", "--size", "32"],
    "bench_segmentation.py": ["--rounds", "2", "--steps", "2", "--warmup", "1", "--cases", "4", "--slices", "4"]
    + ["--size", "32", "--batch-size", "2"],
    "bench_tracking.py": ["--rounds", "1", "--steps", "3", "--backends", "jsonl", "--records", "10"],
}


PRESENT = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))


def test_every_benchmark_has_smoke_settings() -> None:
    """A new script in benchmarks/ gets its tiny settings here (so it is smoke-run); a script removed leaves."""
    missing = [name for name in PRESENT if name not in TINY]
    assert not missing, f"add the tiny settings of {missing} to TINY in tests/test_benchmarks.py"
    assert set(TINY) <= set(PRESENT), f"no such script in benchmarks/: {sorted(set(TINY) - set(PRESENT))}"


@pytest.mark.slow  # a few minutes in all on 2 loaded cores: processes that import torch, some that start ranks
@pytest.mark.parametrize("script", PRESENT)
def test_benchmark_runs_and_prints_its_ratios(script: str) -> None:
    if script not in TINY:
        pytest.fail(f"{script} has no smoke settings in TINY")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *TINY[script]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert "ratio" in done.stdout, f"{script} printed no ratio:\n{done.stdout}"

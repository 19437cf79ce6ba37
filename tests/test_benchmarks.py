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
    "bench_detection.py": ["--images", "8", "--steps", "2", "--warmup", "1", "--rounds", "2", "--batch-size", "2"]
    + ["--image-size", "64"],
    "bench_dist_init.py": ["--repeats", "1"],
    "bench_hang.py": ["--repeats", "1", "--calls", "1000", "--steps", "5", "--collectives", "5"],
    "bench_logging.py": ["--repeats", "1", "--calls", "1000"],
    "bench_numerics.py": ["--repeats", "1", "--steps", "2", "--size", "32", "--drift-calls", "1"],
    "bench_preempt.py": ["--repeats", "1", "--steps", "3", "--size", "32"],
    "bench_segmentation.py": ["--rounds", "2", "--steps", "2", "--warmup", "1", "--cases", "4", "--slices", "4"]
    + ["--size", "32", "--batch-size", "2"],
    "bench_tracking.py": ["--rounds", "1", "--steps", "3", "--backends", "jsonl"],
}


def test_every_benchmark_has_smoke_settings() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("bench_*.py")) == sorted(TINY)


@pytest.mark.slow  # about a minute in all on 2 cores: nine processes that import torch, two that start ranks
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_and_prints_its_ratios(script: str) -> None:
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

"""The ablation driver inside a Slurm allocation (the local two-node cluster): ``sbatch`` runs the driver in the
batch shell, and the driver starts each run as one ``srun`` step over the job's 2 tasks (one per node). A run
that raises on one task is recorded as failed with that rank, and the next step starts clean.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launcher_helpers import ROOT, clean_env

from ratlib.testing import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(420)]

RUN_PY = ROOT / "examples" / "ablation" / "run.py"
TOY = ROOT / "tests" / "ablation_toy" / "train.py"


def test_a_study_under_sbatch_runs_each_run_as_an_srun_step(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "toy-slurm",
                "base": str(TOY),
                "output_dir": str(out),
                "device": "cpu",
                "include_base": False,
                "overrides": {"training.num_epochs": 2, "training.batch_size": 32, "distributed.timeout_s": 120},
                "variants": [
                    {"name": "fine", "overrides": {"model.hidden": 16}},
                    {"name": "rank1-raises", "overrides": {"fault.rank": 1, "fault.at": "step"}},
                    {"name": "after", "overrides": {"model.hidden": 4}},
                ],
            }
        )
    )
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{sys.executable} {RUN_PY} --config {study}\necho DRIVER_RC $?\n")
    log = tmp_path / "job.out"
    env = clean_env(SLURM_CONF=slurm_cluster.env["SLURM_CONF"], MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run(
        ["sbatch", "--parsable", "-N2", "-n2", "-o", str(log), "-D", str(tmp_path), str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 360
    while "DRIVER_RC" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no output"
        time.sleep(0.5)
    text = log.read_text()
    assert re.search(r"DRIVER_RC 0\b", text), text[-5000:]
    assert "each a srun launch of 2 rank(s)" in text, text[-5000:]
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["run"], r["status"]) for r in recs] == [
        ("fine", "finished"),
        ("rank1-raises", "failed"),
        ("after", "finished"),
    ], text[-5000:]
    assert all(r["world_size"] == 2 and len(r["peak_memory_gib"]) == 2 for r in recs)
    error = recs[1]["error"]
    assert (error["rank"], error["type"], error["message"]) == (1, "RuntimeError", "toy fault on rank 1 at a step")
    launch = (out / "logs" / "fine.log").read_text()
    assert "srun --kill-on-bad-exit=1 --label" in launch
    assert json.loads((out / "fine" / "outcome.json").read_text())["status"] == "finished"

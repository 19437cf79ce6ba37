"""Each example's smoke run (cut to 2 steps) under srun (two nodes), mpirun and DeepSpeed's launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
from launcher_helpers import OPENMPI, ROOT, clean_env, need_tools, run_job
from test_launchers import OMPI_ROOT, _deepspeed, _slurm_env

from ratlib.testing import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = ["segmentation", "detection"]
# smoke=true, and smaller still: the point is the launcher, not the training. No loader workers: on Python 3.10
# and 3.11 before 3.11.10 a forked worker can hang in os.fork() (CPython gh-112275; ratlib.strategy.fork_can_deadlock)
TINY = ["smoke=true", "training.num_epochs=1", "training.max_steps=2", "data.limit=4", "data.num_workers=0"]


def _script(example: str, out: Path) -> list[str]:
    script = "train.py"
    return [
        str(ROOT / "examples" / example / script),
        "--config",
        str(ROOT / "examples" / example / "config.yaml"),
        *TINY,
        f"output_dir={out}",
    ]


def _check(result, out: Path) -> None:
    text = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{text[-6000:]}"
    assert (out / "metrics.jsonl").is_file(), f"no metrics.jsonl in {out}:\n{text[-3000:]}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_under_srun_on_two_nodes(example: str, python: str, slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_job(["srun", "-N2", "-n2", python, *_script(example, out)], env=_slurm_env(slurm_cluster), timeout=540)
    _check(result, out)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_under_mpirun(example: str, python: str, tmp_path: Path) -> None:
    need_tools("Open MPI", OPENMPI)
    out = tmp_path / "run"
    result = run_job([OPENMPI, *OMPI_ROOT, "-np", "2", python, *_script(example, out)], env=clean_env(), timeout=540)
    _check(result, out)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_under_deepspeed(example: str, python: str, tmp_path: Path) -> None:
    # DeepSpeed's launcher passes --local_rank=N to the script, which the examples accept
    out = tmp_path / "run"
    cmd = [*_deepspeed(python), "--num_gpus", "2", "--master_port", str(free_port()), *_script(example, out)]
    _check(run_job(cmd, env=clean_env(), timeout=540), out)

"""Helpers of the launcher tests: commands, a clean environment, skips that fail under CI=true.

A launcher that is not installed skips its tests with the apt command; with CI=true it fails them instead, so
CI cannot go green without the launchers (.ci/run installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK_INFO = Path(__file__).with_name("rank_info.py")
APT = (
    "sudo apt-get install -y slurm-wlm munge openmpi-bin libopenmpi-dev mpich (Debian/Ubuntu; .ci/run does this in CI)"
)
# Explicit binaries: Open MPI and MPICH both provide mpirun/mpiexec through Debian's alternatives.
OPENMPI = "mpirun.openmpi"
MPICH = "mpiexec.mpich"
# What a surrounding launcher sets must not leak into the jobs these tests start.
_LEAK = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
_LEAK_PREFIX = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "TORCHELASTIC_", "RATLIB_MPI_")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need(what: str, missing: list[str], install: str = APT) -> None:
    """Skip (locally) or fail (CI=true) when the tools of ``what`` are missing."""
    if not missing:
        return
    reason = f"{what}: {', '.join(missing)} not installed; install with: {install}"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def need_tools(what: str, *tools: str, install: str = APT) -> None:
    path = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent), "/usr/sbin:/sbin"])
    need(what, [t for t in tools if shutil.which(t, path=path) is None], install)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per rank, ratlib importable."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAK and not k.startswith(_LEAK_PREFIX)}
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_job(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 240, cwd: Path | None = None):
    """Run a launcher command; a job that outlives ``timeout`` is a failure (a hang), not a pass. The job runs in
    a session of its own, and a hung one is killed whole (its ranks and their loader workers too, which would
    otherwise outlive the launcher and hold the machine's cores for the tests after it)."""
    proc = subprocess.Popen(
        cmd,
        env=env or clean_env(),
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} did not end within {timeout:g}s:\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def rank_infos(result: subprocess.CompletedProcess[str]) -> list[dict]:
    """The RANKINFO records of rank_info.py, ordered by rank; fails with the job's output when it failed."""
    text = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{text[-6000:]}"
    # raw_decode: a launcher that forwards the ranks' output may run two records into one line
    decoder, parts = json.JSONDecoder(), text.split("RANKINFO ")[1:]
    records = [decoder.raw_decode(part)[0] for part in parts]
    return sorted(records, key=lambda r: r["rank"])


def column(records: list[dict], key: str) -> list:
    return [r[key] for r in records]

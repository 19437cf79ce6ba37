"""The MPI rendezvous and the node index on real ranks, with the launchers' variables set by hand (runs
without any launcher installed): the node index comes from host names, and two jobs that derive one port
fail with an error that says so instead of meeting."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from itertools import count

import pytest
from launcher_helpers import ROOT, clean_env
from launcher_targets import report

from ratlib.launch import job_port
from ratlib.testing import run_on_ranks

pytestmark = [pytest.mark.distributed]


def _infos(run) -> list[dict]:
    run.check()
    return [json.loads(out.split("INFO ", 1)[1].splitlines()[0]) for out in run.stdouts]


def _ompi(rank: int, world: int, local: int, local_size: int, job: str) -> dict[str, str | None]:
    """What mpirun sets (read from a real ``mpirun -np 2 env``), less what ratlib does not read; no MASTER_*."""
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(world),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        "OMPI_COMM_WORLD_NODE_RANK": str(local),  # Open MPI: the rank among the node's processes
        "OMPI_MCA_ess_base_jobid": job,
        "MASTER_ADDR": None,
        "MASTER_PORT": None,
    }


def test_node_rank_comes_from_host_names_not_the_per_node_rank() -> None:
    """3 ranks placed round-robin on two "hosts" (b, a, b): node indices 0, 1, 0 (by each host's lowest rank)."""
    hosts, local, sizes = ["b", "a", "b"], [0, 0, 1], [2, 1, 2]

    def env(rank: int) -> dict[str, str | None]:
        e = _ompi(rank, 3, local[rank], sizes[rank], "77")
        del e["MASTER_ADDR"], e["MASTER_PORT"]  # several nodes: MASTER_* given (run_on_ranks sets them)
        return {**e, "FAKE_HOST": hosts[rank]}

    run = run_on_ranks(report, 3, launcher="none", env=env, timeout=120)
    infos = _infos(run)
    assert [i["node_rank"] for i in infos] == [0, 1, 0]
    assert [i["local_rank"] for i in infos] == [0, 0, 1]


def _colliding_jobs() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for n in count(1):
        job = str(n)
        p = job_port(f"openmpi:{job}")
        if p in seen:
            return seen[p], job
        seen[p] = job
    raise AssertionError("unreachable")


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"job A's rank 0 never listened on {port} (exit {proc.poll()})")


def test_two_jobs_that_derive_one_port_fail_with_a_collision_error() -> None:
    job_a, job_b = _colliding_jobs()
    assert job_port(f"openmpi:{job_a}") == job_port(f"openmpi:{job_b}")
    env_a = clean_env(**{k: v for k, v in _ompi(0, 2, 0, 2, job_a).items() if v is not None}, CONNECT_TIMEOUT="60")
    code = "import sys, launcher_targets; sys.exit(launcher_targets.report())"
    a = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**env_a, "PYTHONPATH": f"{ROOT / 'tests' / 'launchers'}:{env_a['PYTHONPATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # job A's rank 0 hosts the store on the port and waits for its rank 1
    try:
        _wait_listening(job_port(f"openmpi:{job_a}"), a)
        run = run_on_ranks(
            report, 2, launcher="none", env=lambda r: {**_ompi(r, 2, r, 2, job_b), "CONNECT_TIMEOUT": "20"}, timeout=90
        )
    finally:
        a.kill()
        a.communicate()
    out0, out1 = run.outputs
    assert run.returncodes == [3, 3], str(run)
    assert "port collision" in out0 and "already in use" in out0, out0  # job B's rank 0 cannot bind
    assert "port collision" in out1 and f"openmpi:{job_a}" in out1, out1  # job B's rank 1 met job A's store
    assert "MASTER_PORT" in out1  # the fix: give the job its own port

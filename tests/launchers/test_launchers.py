"""Every launcher the README names, run for real: ranks, local ranks, node ranks, one all_reduce; and a failing
rank ends the job with a non-zero exit and its rank in the logs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from launcher_helpers import (
    MPICH,
    OPENMPI,
    RANK_INFO,
    ROOT,
    clean_env,
    column,
    need,
    need_tools,
    rank_infos,
    run_job,
)

from ratlib.testing import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

OMPI_ROOT = ["--allow-run-as-root", "--oversubscribe"]  # as root in CI; 2 ranks on 2 cores


def _need_mpi4py() -> None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        need("mpi4py", ["mpi4py"], install="pip install 'ratlib[mpi]' (make venv does)")


def _torchrun(python: str) -> list[str]:
    return [python, "-m", "torch.distributed.run"]


def _deepspeed(python: str) -> list[str]:
    need_tools("DeepSpeed", "deepspeed", install="pip install 'ratlib[deepspeed]' (make venv does)")
    beside = Path(python).parent / "deepspeed"  # the launcher of the environment that runs the tests
    return [str(beside) if beside.exists() else "deepspeed"]


def _cmd(launcher: str, python: str, script: list[str], slurm=None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start ``script`` on 2 ranks (srun: 4 ranks on 2 nodes)."""
    env = clean_env()
    if launcher == "torchrun":
        return [*_torchrun(python), "--standalone", "--nproc_per_node", "2", *script], env
    if launcher == "srun":
        return ["srun", "-N2", "-n4", python, *script], _slurm_env(slurm)
    if launcher == "mpirun":
        need_tools("Open MPI", OPENMPI)
        return [OPENMPI, *OMPI_ROOT, "-np", "2", python, *script], env
    if launcher == "mpiexec":
        need_tools("MPICH", MPICH)
        return [MPICH, "-n", "2", python, *script], env
    if launcher == "deepspeed":
        port = str(free_port())
        return [*_deepspeed(python), "--num_gpus", "2", "--master_port", port, *script], env
    raise ValueError(launcher)


def _slurm_env(slurm) -> dict[str, str]:
    return {**clean_env(), "SLURM_CONF": slurm.env["SLURM_CONF"]}


def test_torchrun_one_node(python: str) -> None:
    cmd, env = _cmd("torchrun", python, [str(RANK_INFO)])
    records = rank_infos(run_job(cmd, env=env))
    assert column(records, "rank") == [0, 1]
    assert column(records, "local_rank") == [0, 1]
    assert column(records, "node_rank") == [0, 0]
    assert column(records, "launcher") == ["torchrun", "torchrun"]
    assert column(records, "sum") == [1.0, 1.0]


def test_torchrun_two_nodes_on_loopback(python: str) -> None:
    """Two torchrun agents (``--nnodes 2``), one per "node", meeting on 127.0.0.1."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                *_torchrun(python),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(RANK_INFO),
            ],
            env=clean_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)]
    records = sorted((r for res in results for r in rank_infos(res)), key=lambda r: r["rank"])
    assert column(records, "rank") == [0, 1]
    assert column(records, "node_rank") == [0, 1]
    assert column(records, "local_rank") == [0, 0]
    assert column(records, "world_size") == [2, 2]
    assert column(records, "sum") == [1.0, 1.0]


def test_srun_two_nodes(python: str, slurm_cluster) -> None:
    """``srun -N2 -n4`` on the local cluster: two tasks per node, node ranks 0,0,1,1."""
    result = run_job(["srun", "-N2", "-n4", python, str(RANK_INFO)], env=_slurm_env(slurm_cluster))
    records = rank_infos(result)
    assert column(records, "rank") == [0, 1, 2, 3]
    assert column(records, "node_rank") == [0, 0, 1, 1]
    assert column(records, "slurm_nodeid") == ["0", "0", "1", "1"]
    assert column(records, "local_rank") == [0, 1, 0, 1]
    assert column(records, "local_world_size") == [2] * 4
    assert column(records, "launcher") == ["slurm"] * 4
    assert column(records, "sum") == [6.0] * 4


def test_mpirun_openmpi_without_master(python: str) -> None:
    """Open MPI on one node needs no MASTER_*: loopback and the port derived from the job id."""
    cmd, env = _cmd("mpirun", python, [str(RANK_INFO)])
    records = rank_infos(run_job(cmd, env=env))
    assert column(records, "rank") == [0, 1]
    assert column(records, "local_rank") == [0, 1]
    assert column(records, "node_rank") == [0, 0]  # Open MPI's OMPI_COMM_WORLD_NODE_RANK is 0, 1 here
    assert column(records, "launcher") == ["openmpi"] * 2
    assert records[0]["master"] == records[1]["master"]
    assert records[0]["master"].startswith("127.0.0.1:")
    assert column(records, "sum") == [1.0, 1.0]


def test_mpirun_openmpi_over_mpi4py(python: str) -> None:
    """The several-nodes way (rank 0's address and a free port broadcast over mpi4py), forced on one node."""
    _need_mpi4py()
    need_tools("Open MPI", OPENMPI)
    cmd = [OPENMPI, *OMPI_ROOT, "-x", "RATLIB_MPI_RENDEZVOUS", "-np", "2", python, str(RANK_INFO)]
    records = rank_infos(run_job(cmd, env=clean_env(RATLIB_MPI_RENDEZVOUS="mpi4py")))
    assert column(records, "rank") == [0, 1]
    assert not records[0]["master"].startswith("127.0.0.1:")  # rank 0's host address, shared over MPI
    assert records[0]["master"] == records[1]["master"]
    assert column(records, "sum") == [1.0, 1.0]


def test_mpiexec_mpich_without_master(python: str) -> None:
    """MPICH's hydra on one node: the port is derived from the job's proxy process."""
    cmd, env = _cmd("mpiexec", python, [str(RANK_INFO)])
    records = rank_infos(run_job(cmd, env=env))
    assert column(records, "rank") == [0, 1]
    assert column(records, "local_rank") == [0, 1]
    assert column(records, "node_rank") == [0, 0]
    assert column(records, "launcher") == ["mpich"] * 2
    assert records[0]["master"] == records[1]["master"]
    assert column(records, "sum") == [1.0, 1.0]


def test_two_mpich_jobs_at_once_do_not_meet(python: str) -> None:
    """Two MPICH jobs on one node at the same time derive different ports (and both succeed)."""
    cmd, env = _cmd("mpiexec", python, [str(RANK_INFO)])
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    jobs = [rank_infos(subprocess.CompletedProcess(p.args, p.returncode, out, "")) for p, out in zip(procs, outs)]
    assert [column(records, "rank") for records in jobs] == [[0, 1], [0, 1]]
    assert jobs[0][0]["master"] != jobs[1][0]["master"]


def test_deepspeed_launcher(python: str) -> None:
    """DeepSpeed's launcher on the CPU: it passes --local_rank=N to the script; ratlib reads the environment."""
    cmd, env = _cmd("deepspeed", python, [str(RANK_INFO)])
    records = rank_infos(run_job(cmd, env=env))
    assert column(records, "rank") == [0, 1]
    assert column(records, "local_rank") == [0, 1]
    assert column(records, "node_rank") == [0, 0]
    assert column(records, "launcher") == ["deepspeed"] * 2
    assert [r["argv"] for r in records] == [["--local_rank=0"], ["--local_rank=1"]]
    assert column(records, "sum") == [1.0, 1.0]


@pytest.mark.parametrize("launcher", ["torchrun", "srun", "mpirun", "mpiexec", "deepspeed"])
def test_a_failing_rank_ends_the_job(launcher: str, python: str, request: pytest.FixtureRequest) -> None:
    """Rank 1 raises after set-up while the others wait in a barrier: the job ends (the 60 s bound is the
    timeout here, on top of start-up), with a non-zero exit, and the logs name rank 1."""
    slurm = request.getfixturevalue("slurm_cluster") if launcher == "srun" else None
    cmd, env = _cmd(launcher, python, [str(RANK_INFO), "--fail-rank", "1"], slurm)
    result = run_job(cmd, env=env, timeout=60 + 180)  # 180 s for start-up on a loaded 2-core machine
    ended = time.time()
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-4000:]
    assert "rank 1 fails on purpose" in text, text[-4000:]
    assert "rank 1/" in text, text[-4000:]  # distributed() logs "rank 1/N raised RuntimeError"
    failed_at = float(text.split("FAILAT ", 1)[1].split()[0])
    # the bound (a hang detector, not a benchmark): the job ends within 60 s of the raise
    assert ended - failed_at < 60, f"{launcher}: the job ended {ended - failed_at:.0f}s after rank 1 raised"


def _mpirun_on_two_slurm_nodes(python: str, slurm, env: dict[str, str]) -> list[str]:
    """Open MPI inside a two-node allocation of the local cluster: a real 2-node MPI job (orted on n1 and n2,
    OMPI_MCA_orte_num_nodes=2), one rank per node."""
    need_tools("Open MPI", OPENMPI)
    return ["salloc", "-N2", "-n2", OPENMPI, *OMPI_ROOT, "-np", "2", "--map-by", "node", "-x", "PYTHONPATH"]


def test_mpirun_on_two_nodes_shares_the_address_over_mpi4py(python: str, slurm_cluster) -> None:
    _need_mpi4py()
    env = _slurm_env(slurm_cluster)
    cmd = [*_mpirun_on_two_slurm_nodes(python, slurm_cluster, env), python, str(RANK_INFO), "--slurm-node-as-host"]
    records = rank_infos(run_job(cmd, env=env))
    assert column(records, "rank") == [0, 1]
    assert column(records, "local_world_size") == [1, 1]
    assert column(records, "node_rank") == [0, 1]  # derived from the host names (n1, n2), not NODE_RANK (0, 0)
    assert records[0]["master"] == records[1]["master"] and not records[0]["master"].startswith("None")
    assert column(records, "sum") == [1.0, 1.0]


def test_mpirun_on_two_nodes_without_mpi4py_names_both_fixes(python: str, slurm_cluster) -> None:
    env = _slurm_env(slurm_cluster)
    env["PYTHONPATH"] = f"{Path(__file__).with_name('no_mpi4py')}:{env['PYTHONPATH']}"
    cmd = [*_mpirun_on_two_slurm_nodes(python, slurm_cluster, env), python, str(RANK_INFO)]
    result = run_job(cmd, env=env)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-4000:]
    assert "MASTER_ADDR and MASTER_PORT not set for a 2-process openmpi job on several nodes" in text, text[-4000:]
    assert "mpirun -x" in text and "ratlib[mpi]" in text, text[-4000:]

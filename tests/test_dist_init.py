"""ratlib.dist_init and ratlib.comm: launcher parsing (tables and properties) and real gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings

import dist_targets
from ratlib import comm
from ratlib.dist_init import (
    DistInitError,
    detect_launch_env,
    expand_slurm_nodelist,
    expand_slurm_tasks_per_node,
    init_distributed,
    shutdown,
)
from ratlib.testing import run_on_ranks
from ratlib.testing._launch_strategies import launch_envs

VALID = [
    ({}, ("single", 0, 1, 0, 1, 0, None, None)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0",
      "MASTER_ADDR": "h", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"},
     ("torchrun", 3, 8, 3, 4, 0, "h", 29500)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},  # deepspeed-like
     ("env", 5, 8, 1, 8, 0, "h", 1)),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "11", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
      "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_JOB_NODELIST": "gpu[01-02,07]", "SLURM_JOB_ID": "123"},
     ("slurm", 9, 11, 1, 3, 2, "gpu01", 15123)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2",
      "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "m", "MASTER_PORT": "40000", "SLURM_JOB_ID": "7"},
     ("slurm", 0, 2, 0, 2, 0, "m", 40000)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2",
      "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "2"},  # torchrun in SLURM
     ("torchrun", 6, 8, 2, 4, 1, "a", 2)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1"},
     ("openmpi", 2, 4, 0, 2, 1, None, None)),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     ("mpich", 3, 4, 1, 2, 1, None, None)),
    ({"PMIX_RANK": "1", "PMI_SIZE": "2"}, ("mpich", 1, 2, 0, 2, 0, None, None)),
]


@pytest.mark.parametrize("environ,expected", VALID, ids=[v[1][0] + str(i) for i, v in enumerate(VALID)])
def test_detect_launch_env_table(environ: dict[str, str], expected: tuple) -> None:
    env = detect_launch_env(environ)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == expected


INVALID = [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, "RANK='-1' is below 0"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not an integer"),
    ({"RANK": "1"}, "WORLD_SIZE missing while RANK is set"),
    ({"WORLD_SIZE": "2"}, "RANK missing while WORLD_SIZE is set"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' is below 1"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a TCP port"),
    ({"SLURM_PROCID": "1"}, "SLURM_PROCID is set but SLURM_NTASKS is not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NODEID": "3", "SLURM_TASKS_PER_NODE": "2(x2)"},
     "SLURM_NODEID=3 but SLURM_TASKS_PER_NODE lists 2 node(s)"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "gpu[0a]"},
     "range '0a' is not N or N-M"),
    ({"OMPI_COMM_WORLD_RANK": "2"}, "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"),
    ({"PMI_RANK": "0"}, "PMI_RANK is set but PMI_SIZE is not"),
]


@pytest.mark.parametrize("environ,message", INVALID)
def test_detect_launch_env_rejects(environ: dict[str, str], message: str) -> None:
    with pytest.raises(DistInitError) as info:
        detect_launch_env(environ)
    text = str(info.value)
    assert message in text and "Variables read:" in text and "Fix:" in text


@settings(max_examples=150, deadline=None)
@given(launch_envs(valid=True))
def test_any_valid_environment_parses_consistently(case) -> None:
    env = detect_launch_env(case.environ)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        case.launcher, case.rank, case.world_size, case.local_rank, case.local_world_size)
    assert 0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size <= env.world_size


@settings(max_examples=150, deadline=None)
@given(launch_envs(valid=False))
def test_any_corrupted_environment_raises_dist_init_error(case) -> None:
    with pytest.raises(DistInitError) as info:  # never another exception type
        detect_launch_env(case.environ)
    assert case.bad_variable in str(info.value)


def test_slurm_helpers() -> None:
    assert expand_slurm_nodelist("gpu[01-04,07],cpu3") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
    assert expand_slurm_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_slurm_tasks_per_node("4(x2),3") == [4, 4, 3]
    with pytest.raises(ValueError, match="not N or N\\(xM\\)"):
        expand_slurm_tasks_per_node("4(2)")


def test_detect_is_torch_free() -> None:
    code = "import sys; from ratlib.dist_init import detect_launch_env; detect_launch_env(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_single_process_needs_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    import torch

    info = init_distributed(device="cpu")
    try:
        assert (info.world_size, info.rank, info.backend, info.is_main) == (1, 0, None, True)
        assert not torch.distributed.is_initialized()
        assert comm.all_reduce_mean(3.0) == 3.0 and comm.gather_object("x") == ["x"]
        assert comm.reduce_dict({"b": 2.0, "a": 1.0}) == {"a": 1.0, "b": 2.0}
        assert comm.all_gather_object(1) == [1] and comm.broadcast_object(5) == 5
        with pytest.warns(UserWarning, match="different arguments"):
            assert init_distributed(device="cpu", connect_timeout=1) is info
        with pytest.raises(DistInitError, match="backend='nccl' needs CUDA"):
            shutdown()
            init_distributed("nccl", device="cpu")
    finally:
        shutdown()


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_torchrun_full_cycle(tmp_path: Path) -> None:
    run = run_on_ranks(dist_targets.full_cycle, 4, args=("torchrun",), timeout=150,
                       env={"MARKER_DIR": str(tmp_path), "TORCHELASTIC_RUN_ID": "t"}).check()
    for r in range(4):
        assert f"OK rank={r} world=4 local={r}/4 node=0" in run.stdouts[r]


@pytest.mark.distributed
def test_two_ranks_from_slurm_variables_only(tmp_path: Path) -> None:
    run = run_on_ranks(dist_targets.full_cycle, 2, args=("slurm",), launcher="slurm", timeout=120,
                       env={"MARKER_DIR": str(tmp_path), "MASTER_ADDR": None}).check()  # master from the node list
    assert "OK rank=1 world=2 local=1/2 node=0" in run.stdouts[1]


@pytest.mark.distributed
def test_unreachable_master_fails_within_connect_timeout() -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    code = "from ratlib.dist_init import init_distributed\ninit_distributed(connect_timeout=2)"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "DistInitError" in out.stderr
    assert f"cannot reach the rendezvous at MASTER_ADDR=127.0.0.1:MASTER_PORT={port}" in out.stderr
    assert "rank 1/2" in out.stderr and "connect_timeout=2s" in out.stderr
    assert elapsed < 2 + 10  # connect_timeout plus interpreter and torch start-up on a loaded machine


def test_master_port_in_use_is_named() -> None:
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        code = "from ratlib.dist_init import init_distributed\ninit_distributed(connect_timeout=2)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and f"MASTER_PORT={port} is already in use" in out.stderr


@pytest.mark.distributed
def test_rank_raising_inside_distributed_does_not_hang_the_others() -> None:
    start = time.monotonic()
    run = run_on_ranks(dist_targets.raise_on_rank, 3, args=(1,), timeout=90)
    elapsed = time.monotonic() - start
    assert not run.timed_out, run
    assert all(rc not in (0, None) for rc in run.returncodes), run
    assert elapsed < 60
    assert "[rank 1/3] ERROR ratlib.dist_init: rank 1/3 raised ValueError" in run.stderrs[1]
    assert "bad batch on rank 1" in run.stderrs[1]

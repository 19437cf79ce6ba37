"""ratlib.dist_init: launcher parsing (tables and properties), fail-fast set-up, real gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_targets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratlib import comm, dist_init, launch
from ratlib.dist_init import (
    DistInitError,
    detect_launch_env,
    expand_slurm_nodelist,
    expand_slurm_tasks_per_node,
    init_distributed,
    shutdown,
)
from ratlib.testing import free_port, run_on_ranks
from ratlib.testing.strategies import launch_envs

M = {"MASTER_ADDR": "h", "MASTER_PORT": "29500"}
VALID = {
    "single": ({}, ("single", 0, 1, 0, 1, 0, None, None)),
    "torchrun": (
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "3",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "0",
            "TORCHELASTIC_RUN_ID": "x",
            **M,
        },
        ("torchrun", 3, 8, 3, 4, 0, "h", 29500),
    ),
    "by-hand": ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", **M}, ("env", 5, 8, 5, 8, 0, "h", 29500)),
    "deepspeed": (
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_SIZE": "4",
            "CROSS_RANK": "1",
            "CROSS_SIZE": "2",
            **M,
        },
        ("deepspeed", 5, 8, 1, 4, 1, "h", 29500),
    ),
    "kubeflow": (
        {"RANK": "2", "WORLD_SIZE": "4", "KUBERNETES_SERVICE_HOST": "10.96.0.1", **M},
        ("kubeflow", 2, 4, 0, 1, 2, "h", 29500),
    ),
    "torchrun-in-slurm": (
        {
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
            "RANK": "6",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "2",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "a",
            "MASTER_PORT": "2",
        },
        ("torchrun", 6, 8, 2, 4, 1, "a", 2),
    ),
    "slurm": (
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "11",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "2",
            "SLURM_TASKS_PER_NODE": "4(x2),3",
            "SLURM_JOB_NODELIST": "gpu[01-02,07]",
            "SLURM_JOB_ID": "123",
        },
        ("slurm", 9, 11, 1, 3, 2, "gpu01", 15123),
    ),
    "slurm-step": (
        {
            "SLURM_PROCID": "3",
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_TASKS_PER_NODE": "8(x2)",
            "SLURM_STEP_NODELIST": "n[3-4]",
            "SLURM_JOB_NODELIST": "n[1-4]",
            "SLURM_JOB_ID": "10",
            "SLURM_STEP_ID": "1",
        },
        ("slurm", 3, 4, 1, 2, 1, "n3", 15000 + 10 + 7919),
    ),
    "slurm-no-localid": (
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)"},
        ("slurm", 5, 8, 1, 4, 1, None, None),
    ),
    "slurm-master-set": (
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
            "SLURM_TASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "n1",
            "MASTER_ADDR": "m",
            "MASTER_PORT": "40000",
        },
        ("slurm", 0, 2, 0, 2, 0, "m", 40000),
    ),
    "openmpi": (
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "OMPI_COMM_WORLD_NODE_RANK": "1",
        },
        ("openmpi", 2, 4, 0, 2, 1, None, None),
    ),
    "openmpi-in-slurm": (
        {
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
        },
        ("openmpi", 3, 4, 1, 2, 1, None, None),
    ),
    "mvapich": (
        {
            "MV2_COMM_WORLD_RANK": "3",
            "MV2_COMM_WORLD_SIZE": "4",
            "MV2_COMM_WORLD_LOCAL_RANK": "1",
            "MV2_COMM_WORLD_LOCAL_SIZE": "2",
            **M,
        },
        ("mvapich", 3, 4, 1, 2, 1, "h", 29500),
    ),
    "mpich": (
        {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
        ("mpich", 3, 4, 1, 2, 1, None, None),
    ),
    "pmix": ({"PMIX_RANK": "1", "PMI_SIZE": "2"}, ("mpich", 1, 2, 1, 2, 0, None, None)),
    "mpiexec-in-slurm": (
        {
            "PMI_RANK": "5",
            "PMI_SIZE": "8",
            "MPI_LOCALRANKID": "1",
            "MPI_LOCALNRANKS": "4",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
        },
        ("mpich", 5, 8, 1, 4, 1, None, None),
    ),
    "srun-with-pmix": (
        {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "PMIX_RANK": "1", "SLURM_JOB_NODELIST": "a,b"},
        ("slurm", 1, 2, 1, 2, 0, "a", None),
    ),
}


@pytest.mark.parametrize("name", list(VALID))
def test_detect_launch_env_table(name: str) -> None:
    environ, expected = VALID[name]
    env = detect_launch_env(environ)
    assert (
        env.launcher,
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        env.node_rank,
        env.master_addr,
        env.master_port,
    ) == expected
    assert set(env.variables) <= set(environ)


# What a real `mpirun.openmpi -np 2 env` (Open MPI 4.1.4, one node) sets for rank 1, in the part ratlib reads.
OMPI_RANK1 = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_MCA_orte_num_nodes": "1",
    "OMPI_MCA_ess_base_jobid": "1268187137",
    "PMIX_NAMESPACE": "1268187137",
    "PMIX_RANK": "1",
}


def test_openmpi_node_rank_is_never_the_per_node_rank() -> None:
    env = detect_launch_env(OMPI_RANK1)
    assert (env.rank, env.local_rank, env.node_rank) == (1, 1, 0)  # OMPI_COMM_WORLD_NODE_RANK=1 is not the node
    several = {**OMPI_RANK1, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_num_nodes": "2"}
    assert detect_launch_env(several).node_rank == 1  # rank // local size until init derives it from host names


def test_openmpi_on_one_node_derives_loopback_and_a_port_from_the_job() -> None:
    env = detect_launch_env(OMPI_RANK1)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", launch.job_port("openmpi:1268187137"))
    assert env.job_key == "openmpi:1268187137"
    other = detect_launch_env({**OMPI_RANK1, "OMPI_MCA_ess_base_jobid": "1268252673"})
    assert (
        other.master_port != env.master_port
    )  # another job, another port (a collision is an error, see tests/launchers)
    given_by_hand = detect_launch_env({**OMPI_RANK1, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert (given_by_hand.master_addr, given_by_hand.master_port, given_by_hand.job_key) == ("10.0.0.1", 4000, None)
    several = {**OMPI_RANK1, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_num_nodes": "2"}
    assert (detect_launch_env(several).master_addr, detect_launch_env(several).master_port) == (None, None)


def test_mpich_with_a_pmix_namespace_derives_the_port_from_it() -> None:
    env = detect_launch_env({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "PMIX_NAMESPACE": "ns-9"})
    assert (env.master_addr, env.master_port, env.job_key) == (
        "127.0.0.1",
        launch.job_port("mpich:ns-9"),
        "mpich:ns-9",
    )
    hydra = detect_launch_env({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"})  # hydra names no job
    assert (hydra.master_addr, hydra.master_port) == (None, None)  # init_distributed asks the process tree


@given(st.text(min_size=1, max_size=40))
def test_job_port_is_a_fixed_port_in_its_range(job: str) -> None:
    from ratlib.launch import MPI_PORT_BASE, MPI_PORT_SPAN

    port = launch.job_port(job)
    assert MPI_PORT_BASE <= port < MPI_PORT_BASE + MPI_PORT_SPAN and port == launch.job_port(job)


def test_slurm_derived_port_carries_the_job_key() -> None:
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "12", "SLURM_STEP_ID": "3"}
    assert detect_launch_env(base).job_key == "slurm:12.3"
    assert detect_launch_env({**base, "MASTER_PORT": "5000"}).job_key is None


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [(["a", "a", "b", "b"], [0, 0, 1, 1]), (["b", "a", "b", "a"], [0, 1, 0, 1]), (["x"], [0])],
)
def test_node_index_orders_hosts_by_their_lowest_rank(hosts: list[str], expected: list[int]) -> None:
    assert [dist_init._node_index(hosts, r) for r in range(len(hosts))] == expected


INVALID = [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, "RANK='-1' is below 0"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not an integer"),
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' is below 1"),
    (
        {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
        "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
    ),
    (
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"},
        "LOCAL_WORLD_SIZE=4 exceeds WORLD_SIZE=2",
    ),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a TCP port"),
    ({"SLURM_PROCID": "1"}, "SLURM_PROCID is set but SLURM_NTASKS is not"),
    (
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "3",
            "SLURM_TASKS_PER_NODE": "2(x2)",
        },
        "SLURM_NODEID=3 but SLURM_TASKS_PER_NODE='2(x2)' lists fewer nodes",
    ),
    (
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(2)"},
        "SLURM_TASKS_PER_NODE='2(2)': '2(2)' is not N or N(xM)",
    ),
    (
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[0a]"},
        "SLURM_JOB_NODELIST: SLURM node list 'gpu[0a]': range '0a' is not N or N-M",
    ),
    ({"OMPI_COMM_WORLD_RANK": "2"}, "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"),
    ({"MV2_COMM_WORLD_SIZE": "2"}, "MV2_COMM_WORLD_SIZE is set but MV2_COMM_WORLD_RANK is not"),
    ({"PMI_RANK": "0"}, "PMI_RANK is set but PMI_SIZE is not"),
    ({"PMIX_RANK": "0"}, "PMIX_RANK is set but PMI_SIZE is not"),
]


@pytest.mark.parametrize("environ,message", INVALID)
def test_detect_launch_env_rejects(environ: dict[str, str], message: str) -> None:
    with pytest.raises(DistInitError) as info:
        detect_launch_env(environ)
    text = str(info.value)
    problem, _, rest = text.partition(". Got: ")
    assert message in problem and "Fix: " in rest, text


@settings(max_examples=200, deadline=None)
@given(launch_envs(valid=True))
def test_any_valid_environment_parses_to_what_it_describes(case) -> None:
    env = detect_launch_env(case.environ)
    assert (
        env.launcher,
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        env.node_rank,
        env.master_addr,
        env.master_port,
    ) == (
        case.launcher,
        case.rank,
        case.world_size,
        case.local_rank,
        case.local_world_size,
        case.node_rank,
        case.master_addr,
        case.master_port,
    ), case.environ


@settings(max_examples=200, deadline=None)
@given(launch_envs(valid=False))
def test_any_corrupted_environment_raises_naming_the_variable(case) -> None:
    with pytest.raises(DistInitError) as info:  # never another exception type
        detect_launch_env(case.environ)
    problem = str(info.value).partition(". Got: ")[0]
    assert case.bad_variable in problem, (case.note, case.environ, str(info.value))


NAMES = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "LOCAL_SIZE",
    "CROSS_RANK",
    "MASTER_PORT",
    "MASTER_ADDR",
    "KUBERNETES_SERVICE_HOST",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_TASKS_PER_NODE",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
]
VALUES = st.one_of(
    st.integers(-3, 70000).map(str),
    st.text(max_size=12),
    st.sampled_from(["4(x2),3", "gpu[01-03]", "n[3-1]", "a[", " 2 ", "1e3", "２"]),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=8))
def test_arbitrary_environments_parse_consistently_or_raise_dist_init_error(environ: dict[str, str]) -> None:
    try:
        env = detect_launch_env(environ)
    except DistInitError as exc:
        assert "Fix: " in str(exc)
        return
    assert 0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size <= env.world_size
    assert env.master_port is None or 1 <= env.master_port <= 65535


def test_slurm_lists() -> None:
    assert expand_slurm_nodelist("gpu[01-04,07],cpu3") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
    assert expand_slurm_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_slurm_nodelist("rack[1-2]-n[1,3]") == ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]
    assert expand_slurm_nodelist("") == []
    assert expand_slurm_tasks_per_node("4(x2),3") == [4, 4, 3]
    for bad in ("gpu[01-", "gpu]", "gpu[4-2]", "gpu[]"):
        with pytest.raises(ValueError, match="SLURM node list"):
            expand_slurm_nodelist(bad)
    with pytest.raises(ValueError, match=r"not N or N\(xM\)"):
        expand_slurm_tasks_per_node("4(2)")
    start = time.perf_counter()  # the master host comes from the first node, without expanding the rest
    env = detect_launch_env(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
            "SLURM_JOB_NODELIST": "n[0-999999999]",
            "SLURM_TASKS_PER_NODE": "1(x999999999)",
        }
    )
    assert env.master_addr == "n0" and time.perf_counter() - start < 10  # expanding 1e9 names takes minutes


# Other projects' cases for SLURM host lists, and where ratlib's answer comes from. Slurm's own parser
# (src/common/hostlist.c) separates hosts by commas, spaces, tabs and newlines outside brackets, and refuses a
# range with a missing bound; Lightning's SLURMEnvironment and submitit's JobEnvironment resolve the master from
# the first host of the same lists.
PEER_HOSTLISTS = [
    ("alpha,beta,gamma", ["alpha", "beta", "gamma"]),  # Lightning, submitit
    ("alpha beta gamma", ["alpha", "beta", "gamma"]),  # Slurm: spaces separate hosts (was one host "alpha beta gamma")
    ("alpha\tbeta", ["alpha", "beta"]),  # Slurm: tabs too
    ("host[0-2]", ["host0", "host1", "host2"]),  # Lightning
    ("host[00-02],other[5]", ["host00", "host01", "host02", "other5"]),  # submitit: zero padding kept
    ("compute-b24-[1-3,5-9],compute-b25-[1,4,8]", None),  # submitit's long case, checked by count below
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),  # Slurm: a cartesian product
]


@pytest.mark.parametrize(("nodelist", "expected"), PEER_HOSTLISTS)
def test_slurm_host_lists_agree_with_other_projects(nodelist: str, expected: list[str] | None) -> None:
    hosts = expand_slurm_nodelist(nodelist)
    if expected is None:
        assert len(hosts) == 8 + 3 and hosts[0] == "compute-b24-1" and hosts[-1] == "compute-b25-8"
    else:
        assert hosts == expected
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": nodelist})
    assert env.master_addr == hosts[0]


@pytest.mark.parametrize("bad", ["compute-b2[1-,4]", "n[-3]", "n[1-2-3]"])
def test_a_range_with_a_missing_bound_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="is not N or N-M"):
        expand_slurm_nodelist(bad)


def test_detect_is_torch_free() -> None:
    code = (
        "import sys; from ratlib.dist_init import detect_launch_env, get_rank, is_main_process\n"
        "detect_launch_env(); get_rank(); is_main_process(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """No launcher variables from the surrounding shell; shutdown after the test."""
    from ratlib.testing.ranks import LAUNCHER_VARIABLE_PREFIXES, LAUNCHER_VARIABLES

    for name in list(os.environ):
        if name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_VARIABLE_PREFIXES):
            monkeypatch.delenv(name)
    yield monkeypatch
    shutdown()


def test_single_process_needs_no_group(clean_env: pytest.MonkeyPatch) -> None:
    import torch

    info = init_distributed(device="cpu")
    assert (info.world_size, info.rank, info.backend, info.is_main, info.is_distributed) == (1, 0, None, True, False)
    assert info.device == torch.device("cpu") and not torch.distributed.is_initialized()
    assert (dist_init.get_rank(), dist_init.get_world_size(), dist_init.is_main_process()) == (0, 1, True)
    dist_init.barrier()
    with dist_init.main_process_first():
        pass
    assert comm.all_reduce_mean(3) == 3.0 and comm.gather_object("x") == ["x"]
    assert init_distributed(device="cpu") is info
    with pytest.warns(UserWarning, match="different arguments"):
        assert init_distributed(device="cpu", connect_timeout=1) is info
    shutdown()
    with pytest.raises(DistInitError, match="backend='nccl' needs CUDA, but the device is cpu") as err:
        init_distributed("nccl", device="cpu")
    assert "Fix: use backend='gloo'" in str(err.value)
    for kwargs, message in (
        ({"backend": "nclc"}, "backend='nclc'"),
        ({"device": "gpu"}, "device='gpu'"),
        ({"timeout": 0}, "must be positive"),
        ({"connect_timeout": -1}, "must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            init_distributed(**kwargs)


def test_distributed_context_logs_and_tears_down(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KeyError):
        with dist_init.distributed(device="cpu") as info:
            assert dist_init._INFO is info
            raise KeyError("boom")
    assert dist_init._INFO is None
    record = next(r for r in caplog.records if "inside distributed()" in r.getMessage())
    assert record.levelname == "ERROR" and record.getMessage().startswith("KeyError on rank 0/1 inside distributed()")
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_stall_timeout_and_check_collectives_install_hang(clean_env: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    clean_env.setattr(dist_init, "_HANG_INSTALL", dist_init._HANG_INSTALL)  # restored after the test
    dist_init.set_hang_install(lambda **kw: calls.append(kw))  # the hook ratlib.hang registers
    init_distributed(device="cpu")
    assert calls == []  # off unless asked
    shutdown()
    init_distributed(device="cpu", stall_timeout=30.0, check_collectives=True)
    assert calls == [{"stall_timeout": 30.0, "check_collectives": True}]


# The requirement is "a clear error within connect_timeout + 1 s"; benchmarks/bench_dist_init.py measures that
# figure. Here only a bound a hang would break, with room for a loaded 2-core machine.
HANG_MARGIN_S = 30


def _failing_init(
    env: pytest.MonkeyPatch, variables: dict[str, str], connect_timeout: float, device: str = "cpu"
) -> tuple[str, float]:
    for key, value in variables.items():
        env.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(DistInitError) as info:
        init_distributed(device=device, connect_timeout=connect_timeout)
    assert dist_init._INFO is None and "Fix: " in str(info.value)
    return str(info.value), time.monotonic() - start


def test_unreachable_master_fails_within_connect_timeout(clean_env: pytest.MonkeyPatch) -> None:
    port = free_port()  # closed: nobody listens there
    text, elapsed = _failing_init(
        clean_env,
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        connect_timeout=2,
    )
    assert f"rank 1/2 (launcher env): cannot reach the rendezvous at MASTER_ADDR=127.0.0.1:MASTER_PORT={port}" in text
    assert "within connect_timeout=2s" in text and "Connection refused" in text
    assert 2 <= elapsed < 2 + HANG_MARGIN_S, elapsed  # it retried until connect_timeout (a lower bound load keeps)


def test_port_held_by_a_silent_program_fails_within_connect_timeout(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:  # accepts TCP connections (backlog), never answers: torch alone waits forever
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        text, elapsed = _failing_init(
            clean_env,
            {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            connect_timeout=1.5,
        )
    assert f"MASTER_PORT={port} accepts connections but does not answer as a rendezvous store" in text
    assert elapsed < 1.5 + HANG_MARGIN_S, elapsed


def test_rank0_errors_name_the_port_in_use_and_the_missing_ranks(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text, _ = _failing_init(
            clean_env,
            {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            connect_timeout=1,
        )
    assert f"rank 0/2 (launcher env): MASTER_PORT={port} is already in use on this host" in text
    port = free_port()  # rank 0 alone: WORLD_SIZE promises a rank that never comes
    text, elapsed = _failing_init(clean_env, {"MASTER_PORT": str(port)}, connect_timeout=1)
    assert "not every rank reached the rendezvous" in text and "(1/2 ranks joined, rank 0 included)" in text, text
    assert elapsed < 1 + HANG_MARGIN_S, elapsed


def test_master_address_errors(clean_env: pytest.MonkeyPatch) -> None:
    text, _ = _failing_init(clean_env, {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, 1)
    assert "MASTER_ADDR not set for a 2-process job" in text and "Got: RANK='1'" in text
    text, _ = _failing_init(clean_env, {"MASTER_ADDR": "no-such-host.invalid"}, 1)
    assert "MASTER_ADDR='no-such-host.invalid' does not resolve" in text


def test_rank0_store_failure_of_another_kind_is_wrapped(clean_env: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    cause = RuntimeError(
        "The server socket has failed to listen on any local network address. (errno: 13 - "
        "Permission denied)\nException raised from ..."
    )

    def no_server(*args, **kwargs):
        raise cause

    clean_env.setattr(dist, "TCPStore", no_server)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "80"}.items():
        clean_env.setenv(key, value)
    with pytest.raises(DistInitError) as info:
        init_distributed(device="cpu", connect_timeout=1)
    text = str(info.value)
    assert text.startswith(
        "rank 0/2 (launcher env): cannot open the rendezvous on MASTER_PORT=80: The server "
        "socket has failed to listen on any local network address. (errno: 13 - Permission "
        "denied). Got: "
    ), text
    assert "Fix: choose another MASTER_PORT, or check that this host may listen on it" in text
    assert info.value.__cause__ is cause and "Exception raised from" not in text


@pytest.fixture
def store_host():
    """A real TCPStore server on a free port of 127.0.0.1 for a 2-rank job, standing in for rank 0, so that
    rank 1 in this process goes through the real rendezvous (resolve, probe, connect) before init."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    yield server.port
    del server


def _as_rank1(env: pytest.MonkeyPatch, port: int, **extra: str) -> None:
    for key, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        **extra,
    }.items():
        env.setenv(key, value)


def _as_rank3_on_node1(env: pytest.MonkeyPatch, port: int) -> None:
    """Rank 3 of 4 on 2 nodes of 2 GPUs: global and local ranks differ, so pinning cuda:RANK would show."""
    _as_rank1(env, port, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1")


def test_init_process_group_failure_is_wrapped_with_its_cause(clean_env: pytest.MonkeyPatch, store_host: int) -> None:
    import torch.distributed as dist

    boom = RuntimeError("boom\nsecond line of torch's message")
    calls: list[dict] = []

    def failing_init(**kwargs):
        calls.append(kwargs)
        raise boom

    clean_env.setattr(dist, "init_process_group", failing_init)
    _as_rank1(clean_env, store_host)
    with pytest.raises(DistInitError) as info:
        init_distributed(device="cpu", connect_timeout=5)
    text = str(info.value)
    assert len(calls) == 1 and calls[0]["store"] is not None and calls[0]["backend"] == "gloo"  # after the store
    assert (calls[0]["rank"], calls[0]["world_size"]) == (1, 2) and "device_id" not in calls[0]
    assert text.startswith(
        f"rank 1/2 (launcher env): init_process_group(backend='gloo') failed after the "
        f"rendezvous at 127.0.0.1:{store_host}: RuntimeError: boom. Got: "
    ), text
    assert "second line" not in text and "Fix: all ranks must agree on MASTER_ADDR, MASTER_PORT and WORLD_SIZE" in text
    assert info.value.__cause__ is boom
    assert dist_init._INFO is None and not dist.is_initialized()  # nothing left half set up
    assert (dist_init.get_rank(), dist_init.get_world_size()) == (1, 2)  # from the launcher, no group


@pytest.fixture
def fake_cuda(clean_env: pytest.MonkeyPatch):
    """CUDA paths on a CPU machine: 2 visible GPUs, nccl available, and a record of every call, in order."""
    import torch
    import torch.distributed as dist

    calls: list[tuple[str, object]] = []
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    clean_env.setattr(dist, "is_nccl_available", lambda: True)
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    return calls


def test_local_rank_without_a_visible_gpu_names_cuda_visible_devices(
    clean_env: pytest.MonkeyPatch, fake_cuda: list
) -> None:
    text, _ = _failing_init(
        clean_env,
        {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
        1,
        "auto",
    )
    assert text.startswith(
        "rank 2/3 (launcher env): local rank 2 has no GPU: 2 visible (CUDA_VISIBLE_DEVICES=0,1). "
        "Got: RANK='2', WORLD_SIZE='3', LOCAL_RANK='2'"
    ), text
    assert (
        "Fix: start at most 2 processes per node (torchrun --nproc_per_node=2), or make more GPUs visible "
        "(CUDA_VISIBLE_DEVICES)" in text
    )
    assert fake_cuda == []  # no device was set
    clean_env.delenv("CUDA_VISIBLE_DEVICES")
    text, _ = _failing_init(clean_env, {"LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "6", "WORLD_SIZE": "6"}, 1, "cuda")
    assert "local rank 5 has no GPU: 2 visible (CUDA_VISIBLE_DEVICES=<unset>)" in text, text


def _recording_init(calls: list, signature_of: object = None):
    """A stand-in for init_process_group that records its arguments; ``signature_of`` lends it a signature
    (the implementation passes device_id only where init_process_group's signature has it)."""
    import functools

    def fake(backend=None, *, store=None, rank=-1, world_size=-1, timeout=None):  # torch before device_id
        calls.append(
            (
                "init_process_group",
                {"backend": backend, "store": store, "rank": rank, "world_size": world_size, "timeout": timeout},
            )
        )

    def recording(**kwargs):
        calls.append(("init_process_group", kwargs))

    return functools.wraps(signature_of)(recording) if signature_of is not None else fake


@pytest.mark.parametrize("signature", ["installed torch", "torch without device_id"])
def test_cuda_rank_is_pinned_before_init_and_device_id_passed_where_supported(
    clean_env: pytest.MonkeyPatch, fake_cuda: list, store_host: int, signature: str
) -> None:
    import inspect

    import torch
    import torch.distributed as dist

    real = dist.init_process_group
    clean_env.setattr(
        dist, "init_process_group", _recording_init(fake_cuda, real if signature == "installed torch" else None)
    )
    _as_rank3_on_node1(clean_env, store_host)
    info = init_distributed(connect_timeout=5)  # device auto: CUDA "available", so nccl on cuda:LOCAL_RANK
    assert (info.backend, info.device, info.rank, info.local_rank) == ("nccl", torch.device("cuda", 1), 3, 1)
    assert [name for name, _ in fake_cuda] == ["set_device", "init_process_group"]  # pinned first
    assert fake_cuda[0][1] == torch.device("cuda", 1)  # the local rank, not cuda:3 (the global rank)
    kwargs = fake_cuda[1][1]
    assert (kwargs["backend"], kwargs["rank"], kwargs["world_size"]) == ("nccl", 3, 4)
    supported = signature == "installed torch" and "device_id" in inspect.signature(real).parameters
    assert kwargs.get("device_id") == (torch.device("cuda", 1) if supported else None), kwargs
    assert ("device_id" in kwargs) is supported
    if signature == "installed torch" and tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 3):
        assert supported  # init_process_group has had device_id since torch 2.3


def test_gloo_on_cuda_pins_the_device_but_passes_no_device_id(
    clean_env: pytest.MonkeyPatch, fake_cuda: list, store_host: int
) -> None:
    import torch
    import torch.distributed as dist

    clean_env.setattr(dist, "init_process_group", _recording_init(fake_cuda, dist.init_process_group))
    _as_rank3_on_node1(clean_env, store_host)
    info = init_distributed("gloo", connect_timeout=5)  # an explicit backend wins over the device's
    assert (info.backend, info.device) == ("gloo", torch.device("cuda", 1))
    assert [name for name, _ in fake_cuda] == ["set_device", "init_process_group"]
    assert fake_cuda[1][1]["backend"] == "gloo" and "device_id" not in fake_cuda[1][1]


@pytest.mark.gpu
def test_cuda_pins_the_local_rank_and_names_missing_gpus(clean_env: pytest.MonkeyPatch) -> None:
    import torch

    info = init_distributed()  # one process on CUDA: no group, but the device is chosen and made current
    assert info.device == torch.device("cuda", 0) and torch.cuda.current_device() == 0 and info.backend is None
    assert comm.all_reduce_mean(torch.ones(2, device="cuda")).device == info.device
    shutdown()
    n = torch.cuda.device_count()
    text, _ = _failing_init(
        clean_env,
        {
            "RANK": str(n),
            "WORLD_SIZE": str(n + 1),
            "LOCAL_RANK": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        },
        1,
        "auto",
    )
    assert f"local rank {n} has no GPU: {n} visible (CUDA_VISIBLE_DEVICES=" in text
    assert f"--nproc_per_node={n}" in text


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_torchrun_style_full_cycle(tmp_path: Path) -> None:
    run = run_on_ranks(
        dist_targets.full_cycle,
        4,
        args=("torchrun",),
        timeout=150,
        env={"MARKER_DIR": str(tmp_path), "TORCHELASTIC_RUN_ID": "t"},
    ).check()
    for r in range(4):
        assert f"OK rank={r} world=4 local={r}/4 node=0" in run.stdouts[r]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_under_real_torchrun(tmp_path: Path) -> None:
    """torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): rank 0 must join it, not bind the port."""
    env = {**os.environ, "MARKER_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        dist_targets.__file__,
        "full_cycle",
        "torchrun",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(2):
        assert f"OK rank={r} world=2 local={r}/2 node=0 agent_store=True" in out.stdout, out.stdout + out.stderr


@pytest.mark.distributed
def test_two_ranks_from_slurm_variables_only() -> None:
    run = run_on_ranks(
        dist_targets.init_and_leave_to_atexit,
        2,
        args=("slurm",),
        launcher="slurm",
        timeout=120,
        env={"MASTER_ADDR": None},
    ).check()  # the master comes from SLURM_JOB_NODELIST=localhost
    for r in range(2):
        assert f"OK rank={r} world=2 local={r}/2 master=localhost:{run.port}" in run.stdouts[r]
        assert "AT EXIT group_initialized=False" in run.stdouts[r]  # torn down by ratlib's exit hook


@pytest.mark.distributed
def test_rank_raising_inside_distributed_does_not_hang_the_others() -> None:
    run = run_on_ranks(dist_targets.raise_on_rank, 3, args=(1,), timeout=120)
    assert not run.timed_out, run  # a rank waiting for the 30 min collective timeout would hit this deadline
    assert all(rc not in (0, None) for rc in run.returncodes), run
    assert "[rank 1/3] ERROR ratlib.dist_init: ValueError on rank 1/3 inside distributed()" in run.stderrs[1]
    assert "bad batch on rank 1" in run.stderrs[1]


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.distributed
@pytest.mark.slow  # real torchrun: about 4 s a case on an idle machine
@pytest.mark.parametrize("with_files", [True, False])
def test_an_uncaught_ratlib_error_inside_distributed_is_reported_once_per_rank(
    tmp_path: Path, with_files: bool
) -> None:
    """Under real torchrun: the message once per rank (not again by the excepthook and Python), and the
    traceback in the rank's log file, or once on the console without log files."""
    log_dir = str(tmp_path / "logs") if with_files else ""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*run, dist_targets.__file__, "ratlib_error_inside_distributed", log_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    console = out.stdout + out.stderr
    assert out.returncode != 0, console
    for r in range(2):
        head = f"[rank {r}/2] ERROR ratlib.dist_init: CocoPathError on rank {r}/2 inside distributed(), tearing"
        assert len(_lines(console, head)) == 1, console
        assert len(_lines(console, f"[rank {r}/2]")) == 1, console  # no CRITICAL "uncaught" line after it
    assert console.count("Paths tried:") == 2 and console.count("Fix: check root and split") == 2, console
    frames = console.count(", in resolve_coco")  # one per printed traceback
    if with_files:
        assert frames == 0, console
        for r in range(2):
            assert f"(traceback in {tmp_path / 'logs'}/rank{r}.log)" in console
            text = (tmp_path / "logs" / f"rank{r}.log").read_text()
            assert text.count("Traceback (most recent call last)") == 1 and ", in resolve_coco" in text
    else:
        assert frames == 2, console


def test_rank_helpers_are_ratlib_launch_and_an_unknown_rank_is_not_main(clean_env: pytest.MonkeyPatch) -> None:
    from ratlib import launch

    assert (dist_init.get_rank, dist_init.get_world_size, dist_init.is_main_process) == (
        launch.get_rank,
        launch.get_world_size,
        launch.is_main_process,
    )
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "2")
    assert dist_init.is_main_process() is False  # not an exception, not the main rank
    with pytest.raises(DistInitError, match="RANK=5 is not below WORLD_SIZE=2"):
        dist_init.get_rank()  # a rank number cannot be made up
    state = launch.rank_state()
    assert (state.rank, state.world_size, state.known, state.is_main, state.group) == (-1, -1, False, False, False)


def test_init_distributed_reaches_hang_through_the_hook_the_package_registers() -> None:
    code = (
        "import sys, ratlib.dist_init as d\n"
        "assert 'ratlib.hang' not in sys.modules\n"
        "d.init_distributed(device='cpu', stall_timeout=30)\n"
        "import ratlib.hang as h\nprint(h.is_installed())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_the_connect_timeout_comes_from_the_environment_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from ratlib import dist_init

    monkeypatch.delenv("RATLIB_CONNECT_TIMEOUT", raising=False)
    assert dist_init._connect_timeout(None) == 120.0 and dist_init._connect_timeout(5) == 5
    monkeypatch.setenv("RATLIB_CONNECT_TIMEOUT", "600")
    assert dist_init._connect_timeout(None) == 600.0 and dist_init._connect_timeout(5) == 5
    monkeypatch.setenv("RATLIB_CONNECT_TIMEOUT", "ten minutes")
    with pytest.raises(ValueError, match="RATLIB_CONNECT_TIMEOUT='ten minutes' is not a number of seconds"):
        dist_init._connect_timeout(None)


@pytest.mark.distributed
def test_ratlib_connect_timeout_bounds_a_rendezvous_nobody_joins() -> None:
    """Rank 1 of 2 alone (rank 0 never started): the environment's 3 s bound, not the default 120 s."""
    from ratlib.testing import free_port

    code = "from ratlib import dist_init\ndist_init.init_distributed('gloo')\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(free_port()), RATLIB_CONNECT_TIMEOUT="3", CUDA_VISIBLE_DEVICES="")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode != 0 and time.monotonic() - began < 60, done.stderr[-3000:]
    assert "within connect_timeout=3s" in done.stderr, done.stderr[-3000:]

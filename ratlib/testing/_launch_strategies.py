"""Hypothesis strategy over launcher environments (public through ``ratlib.testing.strategies``).

``launch_envs()`` draws the variables a real launcher sets (torchrun, also inside a SLURM
allocation; DeepSpeed's launcher; Kubeflow; RANK/WORLD_SIZE by hand; srun with compressed node and
task lists; Open MPI, MVAPICH and MPICH / Intel MPI / PMI(x), also started inside an allocation; a
single process), each with what ``ratlib.dist_init.detect_launch_env`` must make of it.
``launch_envs(valid=False)`` applies one corruption and names the variable it must be rejected for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from ratlib.errors import message
from ratlib.testing._errors import StrategyArgumentError

LAUNCHERS = ("torchrun", "deepspeed", "kubeflow", "env", "slurm", "openmpi", "mvapich", "mpich", "single")

# launcher -> (rank variable, world-size variable, local-rank variable) as the strategy writes them
_NAMES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "deepspeed": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "kubeflow": ("RANK", "WORLD_SIZE", None),
    "env": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "mvapich": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
}
_LOCAL_SIZE = {
    "torchrun": "LOCAL_WORLD_SIZE",
    "deepspeed": "LOCAL_SIZE",
    "env": "LOCAL_WORLD_SIZE",
    "openmpi": "OMPI_COMM_WORLD_LOCAL_SIZE",
    "mvapich": "MV2_COMM_WORLD_LOCAL_SIZE",
    "mpich": "MPI_LOCALNRANKS",
}
# The SLURM port rule as docs/dist_init.md states it (MASTER_PORT unset: 15000 + (SLURM_JOB_ID + 7919 x
# SLURM_STEP_ID) mod 20000, no step counting as 0), worked out by hand: (job id, step id or None, port).
# Not computed from the formula, so an implementation that drifts from the documented rule fails.
SLURM_PORTS: tuple[tuple[int, int | None, int], ...] = (
    (1, None, 15001),
    (7, 4, 26683),
    (34, None, 15034),
    (34, 5, 34629),
    (77, 0, 15077),
    (4242, 2, 15080),  # 4242 + 15838 = 20080: wraps to 80
    (12081, 1, 15000),  # 12081 + 7919 = 20000: wraps to 0
    (19999, None, 34999),  # the highest port the rule gives
    (20000, None, 15000),
    (20001, None, 15001),
    (123456, None, 18456),
    (123456, 1, 26375),
    (123456, 5, 18051),
    (9999999, 3, 18756),
    (10000000, None, 15000),
)
_NOISE = {"HOME": "/home/user", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "OMP_NUM_THREADS": "4"}


@dataclass(frozen=True)
class LaunchCase:
    """An environment and what ``detect_launch_env`` must make of it.

    Valid: ``launcher``, ``rank``, ``world_size``, ``local_rank``, ``local_world_size``, ``node_rank``,
    ``master_addr`` and ``master_port`` are the exact expected values.
    Invalid (``bad_variable`` set): the ``DistInitError`` must name ``bad_variable`` in its problem
    statement (before ". Got: "); ``note`` says which corruption was applied.
    """

    environ: dict[str, str]
    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    bad_variable: str | None = None
    note: str = field(default="", compare=False)
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def _compress_counts(counts: list[int]) -> str:
    """SLURM's run-length form of tasks per node: [4, 4, 3] -> ``4(x2),3``."""
    runs: list[list[int]] = []
    for c in counts:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return ",".join(f"{c}(x{n})" if n > 1 else str(c) for c, n in runs)


@st.composite
def _hostlist(draw: st.DrawFn, nodes: int) -> tuple[str, str]:
    """A compressed SLURM node list of ``nodes`` hosts, and its first host."""
    prefix = draw(st.sampled_from(["gpu", "node-", "n", "dgx"]))
    start, width = draw(st.integers(0, 120)), draw(st.integers(1, 3))
    numbers = [str(start + i).zfill(width) for i in range(nodes)]
    style = draw(st.sampled_from(["range", "list", "plain"]))
    if style == "plain" or nodes == 1 and draw(st.booleans()):
        text = ",".join(prefix + n for n in numbers)
    elif style == "range":
        text = f"{prefix}[{numbers[0]}-{numbers[-1]}]" if nodes > 1 else f"{prefix}[{numbers[0]}]"
    else:
        text = f"{prefix}[{','.join(numbers)}]"
    if draw(st.booleans()):
        text += ",login[1-2]"  # more hosts after ours: the first one is still the master
    return text, prefix + numbers[0]


@st.composite
def _layout(draw: st.DrawFn, max_nodes: int = 4, max_per_node: int = 8, uniform: bool = True):
    """(counts per node, rank, node, local rank)."""
    nodes = draw(st.integers(1, max_nodes))
    if uniform:
        counts = [draw(st.integers(1, max_per_node))] * nodes
    else:
        counts = draw(st.lists(st.integers(1, max_per_node), min_size=nodes, max_size=nodes))
    rank = draw(st.integers(0, sum(counts) - 1))
    node, local = 0, rank
    while local >= counts[node]:
        local -= counts[node]
        node += 1
    return counts, rank, node, local


@st.composite
def _valid(draw: st.DrawFn, launchers: tuple[str, ...], wrappers: bool = True) -> LaunchCase:
    launcher = draw(st.sampled_from(launchers))
    noise = draw(st.dictionaries(st.sampled_from(sorted(_NOISE)), st.just(""), max_size=2))
    env = {k: _NOISE[k] for k in noise}
    if launcher == "single":
        if draw(st.booleans()):
            env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
        return LaunchCase(env, "single")
    addr = draw(st.sampled_from(["127.0.0.1", "node01", "10.1.2.3", "master.svc.cluster.local"]))
    port = draw(st.integers(1024, 65535))
    if launcher == "slurm":
        return _slurm_case(draw, env, wrappers)
    if launcher == "kubeflow":
        world = draw(st.integers(1, 16))
        rank = draw(st.integers(0, world - 1))
        env.update(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": addr,
                "MASTER_PORT": str(port),
                "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            }
        )
        return LaunchCase(env, "kubeflow", rank, world, 0, 1, node_rank=rank, master_addr=addr, master_port=port)
    counts, rank, node, local = draw(_layout(max_nodes=1 if launcher == "env" else 4))
    per_node, world = counts[0], sum(counts)
    rank_v, world_v, local_v = _NAMES[launcher]
    env.update({rank_v: str(rank), world_v: str(world)})
    if local_v is not None:  # always here (kubeflow, which has none, returned above)
        env[local_v] = str(local)
    expected_addr: str | None = addr
    expected_port: int | None = port
    if launcher != "mpich" or draw(st.booleans()):  # MPI launchers need MASTER_* only at init time
        env.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port)})
    else:
        expected_addr, expected_port = None, None
    if launcher != "env" or draw(st.booleans()):
        env[_LOCAL_SIZE[launcher]] = str(per_node)
    if launcher == "torchrun":
        env.update(
            {
                "GROUP_RANK": str(node),
                "TORCHELASTIC_RUN_ID": draw(st.sampled_from(["none", "job-7"])),
                "TORCHELASTIC_RESTART_COUNT": "0",
            }
        )
        if draw(st.booleans()):
            env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    elif launcher == "deepspeed":
        env.update({"CROSS_RANK": str(node), "CROSS_SIZE": str(len(counts))})
    elif launcher == "openmpi":
        env["OMPI_COMM_WORLD_NODE_RANK"] = str(local)  # Open MPI's per-node rank, not the node's index
    elif launcher == "mpich" and draw(st.booleans()):  # PMIx names the rank differently
        env["PMIX_RANK"] = env.pop("PMI_RANK")
    wrapped = wrappers and launcher in ("torchrun", "openmpi", "mpich") and per_node > 1 and draw(st.booleans())
    if wrapped:  # one torchrun / MPI proxy per node, started by srun: SLURM's own ids are per node
        env.update(
            {
                "SLURM_PROCID": str(node),
                "SLURM_NTASKS": str(len(counts)),
                "SLURM_LOCALID": "0",
                "SLURM_NODEID": str(node),
                "SLURM_TASKS_PER_NODE": f"1(x{len(counts)})",
                "SLURM_JOB_NODELIST": f"gpu[1-{len(counts)}]",
                "SLURM_JOB_ID": "77",
            }
        )
    return LaunchCase(
        env,
        launcher,
        rank,
        world,
        local,
        per_node,
        node_rank=node,
        master_addr=expected_addr,
        master_port=expected_port,
        note="inside SLURM" if wrapped else "",
    )


def _slurm_case(draw: st.DrawFn, env: dict[str, str], wrappers: bool) -> LaunchCase:
    counts, rank, node, local = draw(_layout(uniform=False))
    world = sum(counts)
    hosts, first = draw(_hostlist(len(counts)))
    job, step, slurm_port = draw(st.sampled_from(SLURM_PORTS))
    env.update(
        {
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node),
            "SLURM_JOB_ID": str(job),
            "SLURM_NNODES": str(len(counts)),
        }
    )
    if draw(st.booleans()):  # a step smaller than its allocation: the step's variables must win
        extra = draw(st.integers(1, 8))
        env.update(
            {
                "SLURM_STEP_NUM_TASKS": str(world),
                "SLURM_NTASKS": str(world + extra),
                "SLURM_STEP_TASKS_PER_NODE": _compress_counts(counts),
                "SLURM_TASKS_PER_NODE": _compress_counts([c + extra for c in counts]),
                "SLURM_STEP_NODELIST": hosts,
                "SLURM_JOB_NODELIST": f"big[0-{len(counts) + 3}]",
            }
        )
    else:
        env.update(
            {
                "SLURM_NTASKS": str(world),
                "SLURM_TASKS_PER_NODE": _compress_counts(counts),
                draw(st.sampled_from(["SLURM_JOB_NODELIST", "SLURM_NODELIST"])): hosts,
            }
        )
    if draw(st.integers(0, 4)) == 0:  # hand-made: the local rank follows from the block layout
        del env["SLURM_LOCALID"]
    if step is not None:
        env["SLURM_STEP_ID"] = str(step)
    addr, port = first, slurm_port
    if draw(st.booleans()):
        addr = env["MASTER_ADDR"] = draw(st.sampled_from(["10.0.0.9", "head"]))
    if draw(st.booleans()):
        port = draw(st.integers(1024, 65535))
        env["MASTER_PORT"] = str(port)
    return LaunchCase(
        env, "slurm", rank, world, local, counts[node], node_rank=node, master_addr=addr, master_port=port
    )


_KINDS = ("rank_too_big", "negative", "not_int", "local_too_big", "half_set", "bad_port", "bad_slurm_list")


@st.composite
def _invalid(draw: st.DrawFn, launchers: tuple[str, ...]) -> LaunchCase:
    kind = draw(st.sampled_from(_KINDS))
    pool = tuple(name for name in launchers if name != "single") or ("torchrun",)
    if kind == "bad_slurm_list" and "slurm" in pool:
        pool = ("slurm",)
    base = draw(_valid(pool, wrappers=kind != "half_set"))
    env = dict(base.environ)
    launcher = base.launcher
    rank_v, world_v, local_v = _NAMES[launcher]
    if launcher == "mpich" and "PMIX_RANK" in env:
        rank_v = "PMIX_RANK"
    if launcher == "slurm" and "SLURM_STEP_NUM_TASKS" in env:
        world_v = "SLURM_STEP_NUM_TASKS"
    if kind == "local_too_big" and local_v is None or kind == "bad_slurm_list" and launcher != "slurm":
        kind = "rank_too_big"
    if kind == "rank_too_big":
        env[rank_v] = str(base.world_size + draw(st.integers(0, 5)))
        bad = rank_v
    elif kind == "negative":
        bad = draw(st.sampled_from([rank_v, world_v]))
        env[bad] = str(-draw(st.integers(1, 9)))
    elif kind == "not_int":
        bad = draw(st.sampled_from([v for v in (rank_v, world_v, local_v) if v]))
        env[bad] = draw(st.sampled_from(["", "abc", "1.5", "0x2", "two", "3 4"]))
    elif kind == "local_too_big" and local_v is not None:  # kubeflow, without one, became rank_too_big above
        bad = local_v
        env[bad] = str(base.local_world_size + draw(st.integers(0, 3)))
    elif kind == "half_set":
        for name in (world_v, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS") if launcher == "slurm" else (world_v,):
            env.pop(name, None)
        bad = "SLURM_NTASKS" if launcher == "slurm" else world_v
    elif kind == "bad_port":
        bad = "MASTER_PORT"
        env[bad] = draw(st.sampled_from(["0", "65536", "99999", "-5", "http", "29500.0"]))
    else:  # a SLURM list that cannot be parsed
        name = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env else "SLURM_TASKS_PER_NODE"
        bad, value = name, draw(st.sampled_from(["4(2)", "x", "", "4(x)", "2,,2"]))
        if "MASTER_ADDR" not in env and draw(st.booleans()):
            name = next(n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env)
            bad, value = name, draw(st.sampled_from(["gpu[01-", "gpu]1", "gpu[3-1]", "gpu[a-b]", "gpu[]"]))
        env[name] = value
    return LaunchCase(env, launcher, bad_variable=bad, note=kind)


def launch_envs(valid: bool = True, launchers: tuple[str, ...] | None = None) -> st.SearchStrategy[LaunchCase]:
    """Environments of every launcher ratlib recognises, as ``LaunchCase`` (environ + expectation).

    ``valid=True``: consistent environments (torchrun, deepspeed, kubeflow, env, slurm, openmpi,
    mvapich, mpich, single; also torchrun and MPI started inside a SLURM allocation, and srun steps
    smaller than their allocation) with the exact rank, sizes, node rank and master address and port.
    ``valid=False``: one corruption each (rank >= world size, a negative or non-integer value, a local
    rank outside the local world size, a half-set launcher, a bad MASTER_PORT, an unparsable SLURM
    list) with the variable that must be named. ``launchers`` narrows the draw to some of ``LAUNCHERS``.
    """
    chosen = tuple(launchers or LAUNCHERS)
    unknown = sorted(set(chosen) - set(LAUNCHERS))
    if unknown:
        raise StrategyArgumentError(
            message(f"launch_envs: unknown launchers {unknown}", expected=f"some of {LAUNCHERS}")
        )
    return _valid(chosen) if valid else _invalid(chosen)

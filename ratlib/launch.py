"""Launcher detection and the one answer to "which rank am I, of how many, am I the main one". Torch-free.

``detect_launch_env`` is the one place where launcher variables are parsed (torchrun, DeepSpeed,
Kubeflow, SLURM, Open MPI, MVAPICH, MPICH / Intel MPI / PMI(x), or a single process); it is pure.
``ratlib.dist_init`` re-exports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ratlib.errors import RatlibError, message

__all__ = [
    "DistInitArgumentError",
    "DistInitError",
    "LaunchEnv",
    "RankState",
    "SlurmListError",
    "detect_launch_env",
    "expand_slurm_nodelist",
    "expand_slurm_tasks_per_node",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "group_is_up",
    "is_main_process",
    "job_port",
    "launch_error",
    "process_group",
    "rank_state",
]


class DistInitError(RatlibError, RuntimeError):
    """Process-group set-up failed; the message names the launcher, variables, rank, cause and fix."""


class DistInitArgumentError(DistInitError, ValueError):
    """``init_distributed`` was given an argument it cannot use (device, backend, timeouts)."""


class SlurmListError(RatlibError, ValueError):
    """A SLURM host list or tasks-per-node list that is not in SLURM's compressed form."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, parsed from environment variables (no torch)."""

    # "torchrun", "deepspeed", "kubeflow", "env", "slurm", "openmpi", "mvapich", "mpich", "single"
    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    variables: Mapping[str, str] = field(default_factory=dict)  # the variables read, for messages
    # set when master_addr/master_port were derived from the job, not given: the store is tagged with it, so
    # two jobs that derive one port fail with an error instead of meeting
    job_key: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------------------------
# Launcher environment parsing (pure, torch-free)

_MASTER = ("MASTER_ADDR", "MASTER_PORT")
_TORCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "LOCAL_SIZE",
    "CROSS_RANK",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "KUBERNETES_SERVICE_HOST",
    *_MASTER,
)
_SLURM_VARS = (
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    *_MASTER,
)


@dataclass(frozen=True)
class _Mpi:
    """Variable names of an MPI-style launcher: rank, size, local rank, local size, number of nodes, job id."""

    rank: tuple[str, ...]
    size: str
    local_rank: str
    local_size: str
    nodes: str | None  # how many nodes the job spans; no MPI gives the node's index (see _mpi)
    job: tuple[str, ...]  # a job id every rank shares and two jobs do not
    fix: str


_MPI = {
    "openmpi": _Mpi(
        ("OMPI_COMM_WORLD_RANK",),
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "OMPI_MCA_orte_num_nodes",
        ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"),
        "start every process with mpirun",
    ),
    "mvapich": _Mpi(
        ("MV2_COMM_WORLD_RANK",),
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
        None,
        (),
        "start every process with mpirun_rsh or mpiexec",
    ),
    "mpich": _Mpi(
        ("PMI_RANK", "PMIX_RANK"),
        "PMI_SIZE",
        "MPI_LOCALRANKID",
        "MPI_LOCALNRANKS",
        None,
        ("PMI_KVSNAME", "PMIX_NAMESPACE"),  # MPICH's hydra sets neither: dist_init asks its process tree
        "start every process with mpiexec (MPICH, Intel MPI), or set RANK and WORLD_SIZE instead",
    ),
}


def _fail(launcher: str, read: Mapping[str, str], problem: str, fix: str) -> DistInitError:
    return launch_error(f"{launcher} environment", read, problem, fix)


def _read(env: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {k: str(env[k]) for k in names if k in env}


def _int(read: Mapping[str, str], name: str, launcher: str, *, minimum: int = 0) -> int:
    raw = read[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise _fail(
            launcher, read, f"{name}={raw!r} is not an integer", f"set {name} to a whole number, or unset it"
        ) from None
    if value < minimum:
        raise _fail(launcher, read, f"{name}={raw!r} is below {minimum}", f"set {name} to at least {minimum}")
    return value


def _port(read: Mapping[str, str], launcher: str) -> int | None:
    if "MASTER_PORT" not in read:
        return None
    port = _int(read, "MASTER_PORT", launcher, minimum=1)
    if port > 65535:
        raise _fail(
            launcher,
            read,
            f"MASTER_PORT={read['MASTER_PORT']!r} is not a TCP port",
            "choose a free port between 1024 and 65535",
        )
    return port


def _first(read: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in read), None)


def _check(
    launcher: str, read: Mapping[str, str], values: tuple[int, int, int, int], names: tuple[str, str, str, str]
) -> None:
    """rank < world, local rank < local world <= world; ``names`` are the variables behind each value."""
    rank, world, local_rank, local_world = values
    if rank >= world:
        raise _fail(
            launcher,
            read,
            f"{names[0]}={rank} is not below {names[1]}={world}",
            "each rank must lie in [0, world size); check the launcher's arguments",
        )
    if local_rank >= local_world:
        raise _fail(
            launcher,
            read,
            f"{names[2]}={local_rank} is not below {names[3]}={local_world}",
            "the local rank must lie in [0, processes on this node)",
        )
    if local_world > world:
        raise _fail(
            launcher,
            read,
            f"{names[3]}={local_world} exceeds {names[1]}={world}",
            "a node cannot hold more processes than the job",
        )


def _half_set(launcher: str, read: Mapping[str, str], present: str, missing: str, fix: str) -> DistInitError:
    return _fail(launcher, read, f"{present} is set but {missing} is not (a half-set launcher)", fix)


def _torch_style(env: Mapping[str, str]) -> LaunchEnv:
    """torchrun / torchelastic, DeepSpeed's launcher, Kubeflow, or RANK/WORLD_SIZE set by hand."""
    read = _read(env, _TORCH_VARS)
    if "TORCHELASTIC_RUN_ID" in read or "GROUP_RANK" in read:
        launcher = "torchrun"
    elif "LOCAL_SIZE" in read or "CROSS_RANK" in read:
        launcher = "deepspeed"
    elif "LOCAL_RANK" not in read and "KUBERNETES_SERVICE_HOST" in read:
        launcher = "kubeflow"  # PyTorchJob: one process per pod, RANK is the pod's index
    else:
        launcher = "env"
    for present, missing in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if missing not in read:
            raise _half_set(
                launcher,
                read,
                present,
                missing,
                "set RANK and WORLD_SIZE together (torchrun does), or unset both for one process",
            )
    rank, world = _int(read, "RANK", launcher), _int(read, "WORLD_SIZE", launcher, minimum=1)
    local_world_name = _first(read, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
    if local_world_name:
        local_world = _int(read, local_world_name, launcher, minimum=1)
    else:  # no per-node count: one process per pod on Kubeflow, else assume a single node
        local_world = 1 if launcher == "kubeflow" else world
    local_rank = _int(read, "LOCAL_RANK", launcher) if "LOCAL_RANK" in read else rank % local_world
    node_name = _first(read, ("GROUP_RANK", "CROSS_RANK"))
    node = _int(read, node_name, launcher) if node_name else rank // local_world
    _check(
        launcher,
        read,
        (rank, world, local_rank, local_world),
        ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_name or "LOCAL_WORLD_SIZE"),
    )
    return LaunchEnv(
        launcher,
        rank,
        world,
        local_rank,
        local_world,
        node,
        read.get("MASTER_ADDR") or None,
        _port(read, launcher),
        read,
    )


MPI_PORT_BASE, MPI_PORT_SPAN = 20000, 10000


def job_port(job: str) -> int:
    """The rendezvous port of an MPI job on one node: MPI_PORT_BASE + sha256(job) mod MPI_PORT_SPAN.

    Every rank of the job computes the same port from the job id; two jobs meet on one port with
    probability 1/MPI_PORT_SPAN, and then fail with an error that says so (the store is tagged with the job).
    """
    digest = hashlib.sha256(job.encode()).digest()
    return MPI_PORT_BASE + int.from_bytes(digest[:8], "big") % MPI_PORT_SPAN


def _mpi(env: Mapping[str, str], launcher: str) -> LaunchEnv:
    """Open MPI, MVAPICH or MPICH / Intel MPI / PMI(x): per-process variables set by mpirun / mpiexec.

    No MPI names the node's index (Open MPI's OMPI_COMM_WORLD_NODE_RANK is the rank among the processes on
    the node): it is 0 on one node, else rank // local size until ``init_distributed`` derives it from the
    ranks' host names. On one node without MASTER_*, the rendezvous is 127.0.0.1 on ``job_port(job id)``.
    """
    spec = _MPI[launcher]
    names = (*spec.rank, spec.size, spec.local_rank, spec.local_size, *filter(None, (spec.nodes,)), *spec.job)
    read = _read(env, (*names, *_MASTER))
    rank_name = _first(read, spec.rank) or spec.rank[0]
    if rank_name not in read:
        raise _half_set(launcher, read, spec.size, rank_name, spec.fix)
    if spec.size not in read:
        raise _half_set(launcher, read, rank_name, spec.size, spec.fix)
    rank, world = _int(read, rank_name, launcher), _int(read, spec.size, launcher, minimum=1)
    local_world = _int(read, spec.local_size, launcher, minimum=1) if spec.local_size in read else world
    local_rank = _int(read, spec.local_rank, launcher) if spec.local_rank in read else rank % local_world
    _check(
        launcher, read, (rank, world, local_rank, local_world), (rank_name, spec.size, spec.local_rank, spec.local_size)
    )
    one_node = local_world == world or (spec.nodes in read and _int(read, spec.nodes, launcher, minimum=1) == 1)
    node = 0 if one_node else rank // local_world
    addr, port, job_key = read.get("MASTER_ADDR") or None, _port(read, launcher), None
    job_name = _first(read, spec.job)
    if addr is None and port is None and one_node and job_name and read[job_name].strip():
        job_key = f"{launcher}:{read[job_name].strip()}"
        addr, port = "127.0.0.1", job_port(job_key)
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, addr, port, read, job_key)


# Items are separated as Slurm's own hostlist parser separates them: by commas, spaces, tabs or newlines outside
# brackets ("alpha beta gamma" is three hosts).
_HOST_DELIMS = ", \t\n"
_HOST_ITEM = re.compile(r"[^\[\],\s]*(?:\[[^\[\]]*\][^\[\],\s]*)*")


def _nodelist_items(nodelist: str) -> list[list[str | list[tuple[str, str]]]]:
    """Parse a SLURM host list into items of literal text and range lists, validating all of it
    without expanding (``n[0-99999]`` costs nothing here)."""
    items: list[list[str | list[tuple[str, str]]]] = []
    pos = 0
    while pos <= len(nodelist):
        m = _HOST_ITEM.match(nodelist, pos)
        text = m.group(0) if m else ""
        end = pos + len(text)
        if end < len(nodelist) and nodelist[end] not in _HOST_DELIMS:
            raise SlurmListError(message(f"SLURM node list {nodelist!r}: unbalanced bracket at position {end}"))
        if text.strip():
            parts: list[str | list[tuple[str, str]]] = []
            for piece in re.split(r"(\[[^\]]*\])", text.strip()):
                if not piece.startswith("["):
                    parts.append(piece)
                    continue
                ranges = []
                for part in piece[1:-1].split(","):
                    lo, dash, hi = part.strip().partition("-")
                    if not lo.isdigit() or (dash and not hi.isdigit()) or (hi and int(hi) < int(lo)):
                        raise SlurmListError(
                            message(f"SLURM node list {nodelist!r}: range {part!r} is not N or N-M with N <= M")
                        )
                    ranges.append((lo, hi or lo))
                parts.append(ranges)
            items.append(parts)
        pos = end + 1
    return items


def _expand_item(parts: list[str | list[tuple[str, str]]]) -> Iterator[str]:
    if not parts:
        yield ""
        return
    head, rest = parts[0], parts[1:]
    heads = (
        [head]
        if isinstance(head, str)
        else (str(i).zfill(len(lo)) for lo, hi in head for i in range(int(lo), int(hi) + 1))
    )
    for h in heads:
        for tail in _expand_item(rest):
            yield h + tail


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. ``gpu[01-03,07],cpu3`` -> gpu01 gpu02 gpu03 gpu07 cpu3.

    Raises ``SlurmListError`` (a ``ValueError``) naming the part that is not ``host`` or ``prefix[ranges]suffix``.
    """
    return [host for item in _nodelist_items(nodelist) for host in _expand_item(item)]


def _first_slurm_host(nodelist: str) -> str | None:
    items = _nodelist_items(nodelist)
    return next(_expand_item(items[0]), None) if items else None


def _tasks_per_node(spec: str, name: str = "SLURM_TASKS_PER_NODE") -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SlurmListError(message(f"{name}={spec!r}: {part!r} is not N or N(xM)"))
        out.append((int(m.group(1)), int(m.group(2) or 1)))
    return out


def expand_slurm_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE, e.g. ``4(x2),3`` -> [4, 4, 3]."""
    return [count for count, repeat in _tasks_per_node(spec) for _ in range(repeat)]


def _tasks_on_node(spec: str, node: int, name: str) -> tuple[int, int] | None:
    """(tasks on node ``node``, rank of its first task) per SLURM_TASKS_PER_NODE, without expanding
    it; None past the last node."""
    offset = 0
    for count, repeat in _tasks_per_node(spec, name):
        if node < repeat:
            return count, offset + node * count
        node -= repeat
        offset += count * repeat
    return None


def _slurm(env: Mapping[str, str]) -> LaunchEnv:
    """srun: SLURM's per-task variables; the step's counts win over the allocation's."""
    read = _read(env, _SLURM_VARS)
    launcher, fix = "slurm", "start every task with srun (in sbatch scripts too), or unset SLURM_PROCID"
    world_name = _first(read, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    if world_name is None:
        raise _half_set(launcher, read, "SLURM_PROCID", "SLURM_NTASKS", fix)
    rank, world = _int(read, "SLURM_PROCID", launcher), _int(read, world_name, launcher, minimum=1)
    node = _int(read, "SLURM_NODEID", launcher) if "SLURM_NODEID" in read else 0
    per_node_name = _first(read, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    local_world, first_on_node = world, 0  # without a per-node count: one node
    if per_node_name:
        try:
            on_node = _tasks_on_node(read[per_node_name], node, per_node_name)
        except ValueError as exc:
            raise _fail(launcher, read, str(exc), "SLURM sets this variable; do not set it by hand") from None
        if on_node is None:
            raise _fail(
                launcher,
                read,
                f"SLURM_NODEID={node} but {per_node_name}={read[per_node_name]!r} lists fewer nodes",
                fix,
            )
        local_world, first_on_node = on_node
    if "SLURM_LOCALID" in read:
        local_rank = _int(read, "SLURM_LOCALID", launcher)
    else:  # srun always sets it; derived the way srun's default block distribution places tasks
        local_rank = rank - first_on_node if 0 <= rank - first_on_node < local_world else rank % local_world
    _check(
        launcher,
        read,
        (rank, world, local_rank, local_world),
        ("SLURM_PROCID", world_name, "SLURM_LOCALID", per_node_name or world_name),
    )
    addr = read.get("MASTER_ADDR") or None
    nodelist_name = _first(read, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if addr is None and nodelist_name:
        try:
            addr = _first_slurm_host(read[nodelist_name])
        except ValueError as exc:
            raise _fail(
                launcher, read, f"{nodelist_name}: {exc}", "set MASTER_ADDR to the first node's host name"
            ) from None
    port, job_key = _port(read, launcher), None
    if port is None and "SLURM_JOB_ID" in read:  # the same on every task, different across jobs and steps
        step = _int(read, "SLURM_STEP_ID", launcher) if "SLURM_STEP_ID" in read else 0
        port = 15000 + (_int(read, "SLURM_JOB_ID", launcher) + 7919 * step) % 20000
        job_key = f"slurm:{read['SLURM_JOB_ID'].strip()}.{step}"
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, addr, port, read, job_key)


def _pmi_disagrees_with_slurm(env: Mapping[str, str]) -> bool:
    """MPI started inside an allocation (mpiexec over srun): SLURM_PROCID is then the proxy's, not ours."""
    rank = env.get("PMI_RANK", env.get("PMIX_RANK"))
    world = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    return "PMI_SIZE" in env and (str(rank).strip(), str(env["PMI_SIZE"]).strip()) != (
        str(env["SLURM_PROCID"]).strip(),
        str(world).strip(),
    )


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse the launcher's variables from ``environ`` (default ``os.environ``). Pure and torch-free.

    The most specific variables win: torch-style RANK/WORLD_SIZE (torchrun, also inside SLURM;
    DeepSpeed; Kubeflow), then MPI's per-process ranks (Open MPI, MVAPICH, MPICH / Intel MPI / PMI),
    then SLURM (srun), else a single process. Inconsistent values raise ``DistInitError``.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torch_style(env)
    if "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return _mpi(env, "openmpi")
    if "MV2_COMM_WORLD_RANK" in env or "MV2_COMM_WORLD_SIZE" in env:
        return _mpi(env, "mvapich")
    pmi = "PMI_RANK" in env or "PMIX_RANK" in env
    if "SLURM_PROCID" in env and not (pmi and _pmi_disagrees_with_slurm(env)):
        return _slurm(env)
    if pmi:
        return _mpi(env, "mpich")
    return LaunchEnv("single", variables=_read(env, _MASTER))


# ----------------------------------------------------------------------------------------------
# The one error wording for launcher and set-up failures


def launch_error(where: str, read: Mapping[str, str], problem: str, fix: str) -> DistInitError:
    """``DistInitError`` worded as ``<where>: <problem>. Got: <variables read>. Fix: <fix>.``; ``where`` is
    ``"<launcher> environment"`` while parsing, ``"rank R/W (launcher L)"`` at set-up."""
    shown = ", ".join(f"{k}={v!r}" for k, v in read.items()) or "no launcher variables"
    return DistInitError(message(f"{where}: {problem}", got=shown, fix=fix))


# ----------------------------------------------------------------------------------------------
# Rank state: "is a group up, which rank am I, of how many, am I the main one", answered once


@dataclass(frozen=True)
class RankState:
    """This process's place in the job: the process group's when one is up, else the launcher's. ``rank`` and
    ``world_size`` are -1 when the launcher variables are invalid (``error`` says why): not the main rank."""

    rank: int
    world_size: int
    local_rank: int
    group: bool  # a torch.distributed process group is up (rank and world size are then the group's)
    error: DistInitError | None = None

    @property
    def known(self) -> bool:
        return self.rank >= 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_warned_unknown = False


def process_group() -> Any | None:
    """``torch.distributed`` when it is imported and a process group is up, else None. Never imports torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def group_is_up() -> bool:
    """Whether a torch.distributed process group exists in this process."""
    return process_group() is not None


def rank_state() -> RankState:
    """The rank, world size and local rank, from the process group when one is up, else from the launcher.
    Never raises: invalid launcher variables give rank -1 (not the main rank), warned once per process."""
    global _warned_unknown
    try:
        env: LaunchEnv | None = detect_launch_env()
        error = None
    except DistInitError as exc:
        env, error = None, exc
    dist = process_group()
    if dist is not None:
        return RankState(int(dist.get_rank()), int(dist.get_world_size()), env.local_rank if env else -1, True)
    if env is not None:
        return RankState(env.rank, env.world_size, env.local_rank, False)
    if not _warned_unknown:
        _warned_unknown = True  # set first: the handlers that print this ask for the rank state too
        logging.getLogger("ratlib.launch").warning(
            "ratlib: cannot tell this process's rank (%s); it is not the main rank (main-rank-only work such as "
            "rank_zero_only, progress bars and checkpoint writes is skipped here), and the logger prints every "
            "record, tagged [rank ?/?]",
            error,
        )
    return RankState(-1, -1, -1, False, error)


def get_rank() -> int:
    """This process's global rank: the group's when one is up, else the launcher's (``DistInitError`` when
    there is no group and the launcher variables are invalid)."""
    state = rank_state()
    if state.error is not None:
        raise state.error
    return state.rank


def get_world_size() -> int:
    """How many processes the job has: the group's size when one is up, else the launcher's (already 2 under
    ``torchrun --nproc_per_node 2`` before ``init_distributed()``, while ``ratlib.comm`` waits for the group).
    ``DistInitError`` when there is no group and the launcher variables are invalid."""
    state = rank_state()
    if state.error is not None:
        raise state.error
    return state.world_size


def get_local_rank() -> int:
    """This process's rank on its node (the launcher's); raises ``DistInitError`` on invalid variables."""
    state = rank_state()
    if state.error is not None and state.local_rank < 0:
        raise state.error
    return state.local_rank


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process); False on an unknown rank (warned once)."""
    return rank_state().is_main

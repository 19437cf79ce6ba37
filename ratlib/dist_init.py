"""Launcher detection, process-group set-up and teardown, rank helpers.

``detect_launch_env`` is the one place where launcher variables are parsed (torchrun, DeepSpeed and
Kubeflow, SLURM, Open MPI, MPICH / Intel MPI / PMI(x), or a single process); it is pure and imports no
torch. ``init_distributed`` pins the rank to its GPU, checks that the rendezvous is reachable before it
blocks, and wraps every failure in a ``DistInitError`` that names the launcher, the variables, the
rank, the cause and the fix. Torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DistInfo",
    "DistInitError",
    "LaunchEnv",
    "barrier",
    "detect_launch_env",
    "distributed",
    "expand_slurm_nodelist",
    "expand_slurm_tasks_per_node",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "main_process_first",
    "shutdown",
]


class DistInitError(RuntimeError):
    """Process-group set-up failed; the message names the launcher, variables, rank, cause and fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, parsed from environment variables (no torch)."""

    launcher: str  # "torchrun", "env", "slurm", "openmpi", "mpich", "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    variables: Mapping[str, str] = field(default_factory=dict)  # the variables read, for messages

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, once ``init_distributed`` has run."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    launcher: str
    backend: str | None  # None: single process, no group
    device: torch.device
    master_addr: str | None
    master_port: int | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------------------------
# Launcher environment parsing (pure, torch-free)

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASKS_PER_NODE",
          "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT")
_OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
         "OMPI_COMM_WORLD_NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
_PMI = ("PMI_RANK", "PMIX_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "MASTER_ADDR", "MASTER_PORT")


def _fail(launcher: str, read: Mapping[str, str], problem: str, fix: str) -> DistInitError:
    shown = ", ".join(f"{k}={v!r}" for k, v in read.items()) or "none"
    return DistInitError(f"{launcher} environment: {problem}. Variables read: {shown}. Fix: {fix}")


def _read(env: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {k: env[k] for k in names if k in env}


def _int(read: Mapping[str, str], name: str, launcher: str, *, minimum: int = 0) -> int:
    raw = read[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise _fail(launcher, read, f"{name}={raw!r} is not an integer",
                    f"set {name} to a whole number or unset it") from None
    if value < minimum:
        raise _fail(launcher, read, f"{name}={raw!r} is below {minimum}", f"set {name} to at least {minimum}")
    return value


def _port(read: Mapping[str, str], launcher: str) -> int | None:
    if "MASTER_PORT" not in read:
        return None
    port = _int(read, "MASTER_PORT", launcher, minimum=1)
    if port > 65535:
        raise _fail(launcher, read, f"MASTER_PORT={read['MASTER_PORT']!r} is not a TCP port",
                    "choose a free port between 1024 and 65535")
    return port


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. ``gpu[01-03,07],cpu3`` -> gpu01 gpu02 gpu03 gpu07 cpu3."""
    items, depth, current = [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    hosts: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", item)
        if m is None:
            if "[" in item or "]" in item:
                raise ValueError(f"SLURM node list {nodelist!r}: {item!r} is not host or prefix[ranges]")
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.strip().partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"SLURM node list {nodelist!r}: range {part!r} is not N or N-M")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def expand_slurm_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE, e.g. ``4(x2),3`` -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: {part!r} is not N or N(xM)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _check(launcher: str, read: Mapping[str, str], rank: int, world: int, local_rank: int, local_world: int,
           rank_names: tuple[str, str], local_names: tuple[str, str]) -> None:
    if world < 1:
        raise _fail(launcher, read, f"{rank_names[1]}={world} must be at least 1", "fix the launcher's world size")
    if rank >= world:
        raise _fail(launcher, read, f"{rank_names[0]}={rank} is not below {rank_names[1]}={world}",
                    "each rank must lie in [0, world size); check the launcher's arguments")
    if local_rank >= local_world:
        raise _fail(launcher, read, f"{local_names[0]}={local_rank} is not below {local_names[1]}={local_world}",
                    "the local rank must lie in [0, processes on this node)")
    if local_world > world:
        raise _fail(launcher, read, f"{local_names[1]}={local_world} exceeds {rank_names[1]}={world}",
                    "a node cannot hold more processes than the job")


def _torchrun(env: Mapping[str, str]) -> LaunchEnv:
    read = _read(env, _TORCHRUN + ("TORCHELASTIC_RUN_ID",))
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env else "env"
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise _fail(launcher, read, f"{' and '.join(missing)} missing while "
                    f"{'RANK' if 'RANK' in env else 'WORLD_SIZE'} is set (a half-set launcher)",
                    "set RANK and WORLD_SIZE together (torchrun does), or unset both for one process")
    rank, world = _int(read, "RANK", launcher), _int(read, "WORLD_SIZE", launcher, minimum=1)
    local_rank = _int(read, "LOCAL_RANK", launcher) if "LOCAL_RANK" in read else rank
    if "LOCAL_WORLD_SIZE" in read:
        local_world = _int(read, "LOCAL_WORLD_SIZE", launcher, minimum=1)
    else:  # older launchers set only LOCAL_RANK: assume one node
        local_world = world
    node = _int(read, "GROUP_RANK", launcher) if "GROUP_RANK" in read else (rank // local_world)
    _check(launcher, read, rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE"),
           ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, read.get("MASTER_ADDR"),
                     _port(read, launcher), read)


def _slurm(env: Mapping[str, str]) -> LaunchEnv:
    read = _read(env, _SLURM)
    launcher = "slurm"
    if "SLURM_NTASKS" not in env:
        raise _fail(launcher, read, "SLURM_PROCID is set but SLURM_NTASKS is not",
                    "start the job with srun (or sbatch --ntasks=N), or unset SLURM_PROCID")
    rank, world = _int(read, "SLURM_PROCID", launcher), _int(read, "SLURM_NTASKS", launcher, minimum=1)
    local_rank = _int(read, "SLURM_LOCALID", launcher) if "SLURM_LOCALID" in read else 0
    node = _int(read, "SLURM_NODEID", launcher) if "SLURM_NODEID" in read else 0
    local_world = 1 if world == 1 else world
    if "SLURM_TASKS_PER_NODE" in read:
        try:
            per_node = expand_slurm_tasks_per_node(read["SLURM_TASKS_PER_NODE"])
        except ValueError as exc:
            raise _fail(launcher, read, str(exc), "this variable is set by SLURM; do not set it by hand") from None
        if node >= len(per_node):
            raise _fail(launcher, read, f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE lists {len(per_node)} node(s)",
                        "run the job through srun so that SLURM sets consistent variables")
        local_world = per_node[node]
    _check(launcher, read, rank, world, local_rank, local_world, ("SLURM_PROCID", "SLURM_NTASKS"),
           ("SLURM_LOCALID", "SLURM_TASKS_PER_NODE"))
    addr = read.get("MASTER_ADDR")
    if addr is None:
        nodelist = read.get("SLURM_STEP_NODELIST") or read.get("SLURM_JOB_NODELIST") or read.get("SLURM_NODELIST")
        if nodelist:
            try:
                hosts = expand_slurm_nodelist(nodelist)
            except ValueError as exc:
                raise _fail(launcher, read, str(exc), "set MASTER_ADDR to the first node's host name") from None
            addr = hosts[0] if hosts else None
    port = _port(read, launcher)
    if port is None and "SLURM_JOB_ID" in read:
        port = 15000 + _int(read, "SLURM_JOB_ID", launcher) % 20000  # same on every task, differs across jobs
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, addr, port, read)


def _openmpi(env: Mapping[str, str]) -> LaunchEnv:
    read = _read(env, _OMPI)
    launcher = "openmpi"
    if "OMPI_COMM_WORLD_SIZE" not in env:
        raise _fail(launcher, read, "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not",
                    "start the job with mpirun, or unset OMPI_COMM_WORLD_RANK")
    rank = _int(read, "OMPI_COMM_WORLD_RANK", launcher)
    world = _int(read, "OMPI_COMM_WORLD_SIZE", launcher, minimum=1)
    local_rank = _int(read, "OMPI_COMM_WORLD_LOCAL_RANK", launcher) if "OMPI_COMM_WORLD_LOCAL_RANK" in read else 0
    local_world = (_int(read, "OMPI_COMM_WORLD_LOCAL_SIZE", launcher, minimum=1)
                   if "OMPI_COMM_WORLD_LOCAL_SIZE" in read else world)
    node = _int(read, "OMPI_COMM_WORLD_NODE_RANK", launcher) if "OMPI_COMM_WORLD_NODE_RANK" in read else 0
    _check(launcher, read, rank, world, local_rank, local_world, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
           ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, read.get("MASTER_ADDR"),
                     _port(read, launcher), read)


def _pmi(env: Mapping[str, str]) -> LaunchEnv:
    read = _read(env, _PMI)
    launcher = "mpich"
    rank_name = "PMI_RANK" if "PMI_RANK" in env else "PMIX_RANK"
    if "PMI_SIZE" not in env:
        raise _fail(launcher, read, f"{rank_name} is set but PMI_SIZE is not",
                    "start the job with mpiexec (MPICH, Intel MPI), or set RANK and WORLD_SIZE instead")
    rank, world = _int(read, rank_name, launcher), _int(read, "PMI_SIZE", launcher, minimum=1)
    local_rank = _int(read, "MPI_LOCALRANKID", launcher) if "MPI_LOCALRANKID" in read else 0
    local_world = _int(read, "MPI_LOCALNRANKS", launcher, minimum=1) if "MPI_LOCALNRANKS" in read else world
    _check(launcher, read, rank, world, local_rank, local_world, (rank_name, "PMI_SIZE"),
           ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
    node = rank // local_world if "MPI_LOCALNRANKS" in read else 0
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, read.get("MASTER_ADDR"),
                     _port(read, launcher), read)


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse the launcher's variables from ``environ`` (default ``os.environ``). Pure and torch-free.

    Order: torchrun-style variables (RANK/WORLD_SIZE, also set by DeepSpeed and Kubeflow) win, so
    torchrun inside a SLURM allocation is read as torchrun; then SLURM (srun), Open MPI, MPICH / Intel
    MPI / PMI(x); else a single process. Inconsistent values raise ``DistInitError``.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun(env)
    if "SLURM_PROCID" in env:
        return _slurm(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _openmpi(env)
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        if "PMI_SIZE" not in env and "OMPI_COMM_WORLD_SIZE" in env:  # PMIx under Open MPI
            return _openmpi({**env, "OMPI_COMM_WORLD_RANK": env["PMIX_RANK"]})
        return _pmi(env)
    return LaunchEnv("single", variables=_read(env, ("MASTER_ADDR", "MASTER_PORT")))


# ----------------------------------------------------------------------------------------------
# Process group

_INFO: DistInfo | None = None
_INIT_ARGS: dict[str, Any] | None = None
_ATEXIT_REGISTERED = False


def _torch_dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover
        raise ImportError("ratlib.dist_init needs torch: pip install torch") from exc
    return dist


def _group_ready() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _where(launch: LaunchEnv) -> str:
    return f"rank {launch.rank}/{launch.world_size} (launcher {launch.launcher})"


def _check_rendezvous(launch: LaunchEnv, connect_timeout: float) -> None:
    """Fail fast: rank 0 must be able to bind MASTER_PORT; other ranks must reach it in time."""
    addr, port = launch.master_addr, launch.master_port
    read = dict(launch.variables)
    if not addr or port is None:
        missing = " and ".join(n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not v)
        raise _fail(launch.launcher, read, f"{_where(launch)}: {missing} not set for a {launch.world_size}-process job",
                    f"export {missing} (the host and a free port of rank 0), or launch with torchrun")
    if launch.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError as exc:
                raise DistInitError(
                    f"{_where(launch)}: MASTER_PORT={port} is already in use on this host ({exc.strerror}); "
                    f"another job or a previous run still holds it. Fix: choose another MASTER_PORT "
                    f"(e.g. torchrun --master_port), or stop the process using it (`ss -ltnp | grep {port}`)"
                ) from exc
        return
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DistInitError(
            f"{_where(launch)}: MASTER_ADDR={addr!r} does not resolve ({exc.strerror}). Fix: set MASTER_ADDR to "
            f"rank 0's host name or IP address as seen from this node"
        ) from exc
    deadline = time.monotonic() + connect_timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, max(connect_timeout, 0.1))):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise DistInitError(
        f"{_where(launch)}: cannot reach the rendezvous at MASTER_ADDR={addr}:MASTER_PORT={port} within "
        f"connect_timeout={connect_timeout:g}s (last error: {last}). Likely fixes: rank 0 has not started or "
        f"crashed (check its log); MASTER_ADDR is not rank 0's address as seen from this node; MASTER_PORT "
        f"differs between ranks; a firewall blocks the port"
    )


def _resolve_device(device: str, launch: LaunchEnv) -> torch.device:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"init_distributed: device={device!r}; expected 'auto', 'cuda' or 'cpu'")
    if not torch.cuda.is_available():
        raise DistInitError(f"{_where(launch)}: device='cuda' but torch.cuda.is_available() is False. "
                            "Fix: pass device='cpu' (and backend='gloo'), or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise DistInitError(
            f"{_where(launch)}: local rank {launch.local_rank} has no GPU: only {count} visible "
            f"(CUDA_VISIBLE_DEVICES={visible}). Fix: start at most {count} processes per node "
            f"(--nproc_per_node={count}), or make more GPUs visible"
        )
    dev = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(dev)  # before init: otherwise every rank lands on GPU 0
    return dev


def init_distributed(
    backend: str | None = None,
    *,
    timeout: float | timedelta = timedelta(minutes=30),
    connect_timeout: float = 60.0,
    device: str = "auto",
    stall_timeout: float | None = None,
    check_collectives: bool = False,
) -> DistInfo:
    """Set up the process group from the launcher's environment and return this rank's ``DistInfo``.

    Backend nccl with CUDA, else gloo (an explicit choice wins). On CUDA the rank is pinned to
    ``cuda:LOCAL_RANK`` before initialising. Before the blocking rendezvous, a rank other than 0
    checks that MASTER_ADDR:MASTER_PORT accepts connections within ``connect_timeout`` seconds.
    A single process creates no group. Idempotent: a second call returns the same ``DistInfo``.
    ``stall_timeout`` / ``check_collectives`` install ``ratlib.hang`` once the group exists.
    """
    global _INFO, _INIT_ARGS, _ATEXIT_REGISTERED
    args = {"backend": backend, "timeout": timeout, "connect_timeout": connect_timeout, "device": device,
            "stall_timeout": stall_timeout, "check_collectives": check_collectives}
    if _INFO is not None and (_INFO.world_size == 1 or _group_ready()):
        if args != _INIT_ARGS:
            warnings.warn(f"init_distributed called again with different arguments {args} (first: {_INIT_ARGS}); "
                          "the first call's set-up stays in force", stacklevel=2)
        return _INFO
    launch = detect_launch_env()
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        raise ValueError(f"init_distributed: backend={backend!r}; expected 'nccl', 'gloo' (or None to choose)")
    dev = _resolve_device(device, launch)
    chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if chosen == "nccl" and dev.type != "cuda":
        raise DistInitError(f"{_where(launch)}: backend='nccl' needs CUDA, but the device is {dev}. "
                            "Fix: use backend='gloo' on CPU, or run on GPUs")
    td = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if launch.world_size > 1 and not _group_ready():
        _check_rendezvous(launch, connect_timeout)
        dist = _torch_dist()
        kwargs: dict[str, Any] = {"backend": chosen, "init_method": f"tcp://{_host(launch.master_addr)}:"
                                  f"{launch.master_port}", "rank": launch.rank, "world_size": launch.world_size,
                                  "timeout": td}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(**kwargs)
        except Exception as exc:
            raise DistInitError(
                f"{_where(launch)}: init_process_group(backend={chosen!r}, init_method={kwargs['init_method']!r}) "
                f"failed: {type(exc).__name__}: {exc}. Variables read: {dict(launch.variables)}. Likely fixes: all "
                f"ranks must agree on MASTER_ADDR/MASTER_PORT and WORLD_SIZE; every rank must start within "
                f"timeout={td}"
            ) from exc
    _INFO = DistInfo(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.node_rank,
                     launch.launcher, chosen if launch.world_size > 1 else None, dev, launch.master_addr,
                     launch.master_port)
    _INIT_ARGS = args
    if not _ATEXIT_REGISTERED:
        atexit.register(shutdown)
        _ATEXIT_REGISTERED = True
    if stall_timeout is not None or check_collectives:
        from ratlib import hang

        hang.install(stall_timeout=stall_timeout, check_collectives=check_collectives)
    return _INFO


def _host(addr: str | None) -> str:
    return f"[{addr}]" if addr and ":" in addr and not addr.startswith("[") else str(addr)


def shutdown() -> None:
    """Destroy the process group if one exists; safe to call any number of times."""
    global _INFO, _INIT_ARGS
    if _group_ready():
        sys.modules["torch.distributed"].destroy_process_group()
    _INFO, _INIT_ARGS = None, None


@contextlib.contextmanager
def distributed(backend: str | None = None, **kwargs: Any) -> Iterator[DistInfo]:
    """``init_distributed`` for the block, and teardown always: on normal exit and on an exception.

    An exception on one rank is logged with its rank tag before the group goes, so that the other
    ranks, which then fail in their next collective, do not leave the cause unnamed.
    """
    info = init_distributed(backend, **kwargs)
    try:
        yield info
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            try:
                from ratlib.rank_logger import get_logger

                get_logger("ratlib.dist_init").error(
                    "rank %d/%d raised %s inside distributed(); tearing down the process group",
                    info.rank, info.world_size, type(exc).__name__, exc_info=exc, main_process_only=False)
            except Exception:  # the logger must never mask the original error
                print(f"[rank {info.rank}/{info.world_size}] raised {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    finally:
        shutdown()


# ----------------------------------------------------------------------------------------------
# Rank helpers: correct before init (from the launcher), with a group, and after teardown


def get_rank() -> int:
    """This process's global rank: from the process group when there is one, else from the launcher."""
    if _group_ready():
        return int(sys.modules["torch.distributed"].get_rank())
    return detect_launch_env().rank


def get_world_size() -> int:
    """Number of processes: from the process group when there is one, else from the launcher."""
    if _group_ready():
        return int(sys.modules["torch.distributed"].get_world_size())
    return detect_launch_env().world_size


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not _group_ready():
        return
    dist = sys.modules["torch.distributed"]
    if dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main rank runs the block first (download, preprocessing); the others wait, then run it."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()

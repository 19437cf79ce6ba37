"""Process-group set-up and teardown, rank helpers; re-exports launcher detection from ``ratlib.launch``.

``init_distributed`` pins the rank to its GPU, checks that the rendezvous is
reachable before it blocks, and turns every failure into a ``DistInitError`` that names the launcher,
the variables, the rank, the cause and the fix. Torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratlib.errors import MissingDependencyError, message
from ratlib.launch import (
    _MASTER,
    DistInitArgumentError,
    DistInitError,
    LaunchEnv,
    detect_launch_env,
    expand_slurm_nodelist,
    expand_slurm_tasks_per_node,
    get_rank,
    get_world_size,
    group_is_up,
    is_main_process,
    job_port,
    launch_error,
)

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
# Process group

_INFO: DistInfo | None = None
_INIT_ARGS: dict[str, Any] | None = None
_ATEXIT_REGISTERED = False
_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl")


def _torch_dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError(message("ratlib.dist_init needs torch", fix="pip install torch")) from exc
    return dist


_group_ready = group_is_up  # the one definition is ratlib.launch's


def _where(launch: LaunchEnv) -> str:
    return f"rank {launch.rank}/{launch.world_size} (launcher {launch.launcher})"


def _init_error(launch: LaunchEnv, problem: str, fix: str) -> DistInitError:
    return launch_error(_where(launch), launch.variables, problem, fix)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]


def _uses_agent_store(launch: LaunchEnv) -> bool:
    """torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT; every rank is a client."""
    return launch.variables.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _probe(addr: str, port: int, deadline: float) -> OSError | None:
    """Try TCP connections to addr:port until one succeeds (None) or ``deadline`` passes (the last error)."""
    last: OSError | None = None
    pause = 0.0005  # rank 0's server is usually a millisecond or two away: retry fast, then back off to 0.25 s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return last or TimeoutError(f"no attempt fitted in the time left ({remaining:.1f}s)")
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, remaining)):
                return None
        except OSError as exc:
            last = exc
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.25)


def _client_store(launch: LaunchEnv, deadline: float, connect_timeout: float) -> Any:
    """A TCPStore client, within ``deadline``: resolve, probe the port, then connect in a thread,
    because torch's handshake waits forever on a port held by a program that never answers."""
    addr, port = str(launch.master_addr), int(launch.master_port or 0)
    reach_fix = (
        "rank 0 has not started or crashed (check its log); MASTER_ADDR must be rank 0's address as seen "
        "from this node; every rank needs the same MASTER_PORT; a firewall may block the port; or raise "
        "connect_timeout when ranks start far apart"
    )
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _init_error(
            launch,
            f"MASTER_ADDR={addr!r} does not resolve ({exc.strerror})",
            "set MASTER_ADDR to rank 0's host name or IP address as seen from this node",
        ) from exc
    start = time.monotonic()
    error = _probe(addr, port, deadline)
    if error is not None:
        raise _init_error(
            launch,
            f"cannot reach the rendezvous at MASTER_ADDR={addr}:MASTER_PORT={port} within "
            f"connect_timeout={connect_timeout:g}s (gave up after {time.monotonic() - start:.1f}s; "
            f"last error: {error})",
            reach_fix,
        )
    dist, box = _torch_dist(), {}

    def connect() -> None:
        try:
            left = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
            box["store"] = dist.TCPStore(addr, port, launch.world_size, False, timeout=left)
        except Exception as exc:  # handed to the main thread
            box["error"] = exc

    thread = threading.Thread(target=connect, name="ratlib-store-connect", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 1.0) + 0.5)
    if "store" in box:
        if _uses_agent_store(launch):  # as torch's env:// rendezvous: each torchrun restart gets its own keys
            attempt = launch.variables.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT")
            return dist.PrefixStore(f"/worker/attempt_{attempt or 0}", box["store"])
        if launch.job_key and not _uses_agent_store(launch):
            _check_job(launch, box["store"])
        if not _uses_agent_store(launch) and box["store"].add(_JOINED, 1) == launch.world_size - 1:
            box["store"].set(_ALL_JOINED, "1")  # the last rank in wakes rank 0 (see _server_store)
        return box["store"]
    if "error" in box:
        raise _init_error(
            launch,
            f"the rendezvous at MASTER_ADDR={addr}:MASTER_PORT={port} refused this rank: {_first_line(box['error'])}",
            reach_fix,
        ) from box["error"]
    raise _init_error(
        launch,
        f"MASTER_ADDR={addr}:MASTER_PORT={port} accepts connections but does not answer as "
        f"a rendezvous store within connect_timeout={connect_timeout:g}s",
        "another program holds that port, or rank 0 is stuck: choose another MASTER_PORT "
        f"(`ss -ltnp | grep {port}` on {addr} shows who holds it)",
    )


_JOINED = "ratlib/dist_init/joined"  # each client rank adds 1 once connected
_ALL_JOINED = "ratlib/dist_init/all-joined"  # set by the last client in; rank 0 waits for it
_JOB = "ratlib/dist_init/job"  # rank 0 tags a store on a port derived from the job with the job's key


_COLLISION_FIX = (
    "give this job its own rendezvous: export MASTER_ADDR=127.0.0.1 and MASTER_PORT=<a free port> to every "
    "rank (mpirun -x MASTER_ADDR -x MASTER_PORT; srun passes the environment)"
)


def _check_job(launch: LaunchEnv, store: Any) -> None:
    """A port derived from the job id may be another job's (1 in MPI_PORT_SPAN): its key then differs."""
    port = launch.master_port
    try:
        theirs = store.get(_JOB).decode(errors="replace")
    except Exception as exc:
        raise _init_error(
            launch,
            f"the port {launch.master_addr}:{port} derived from job {launch.job_key!r} answers, but not as this "
            f"job's rendezvous (no job key within connect_timeout: {_first_line(exc)})",
            _COLLISION_FIX,
        ) from exc
    if theirs != launch.job_key:
        raise _init_error(
            launch,
            f"port collision: the port {port} derived from job {launch.job_key!r} is held by another job "
            f"({theirs!r}) on {launch.master_addr}",
            _COLLISION_FIX,
        )


def _server_store(launch: LaunchEnv, connect_timeout: float) -> Any:
    """Rank 0 hosts the store and waits up to ``connect_timeout`` for every other rank to join.

    The clients count themselves in and the last one sets a key that rank 0 waits for in the store
    (``store.wait``: no polling), so a failed rendezvous can say how many ranks arrived.
    """
    port = int(launch.master_port or 0)
    try:
        store = _torch_dist().TCPStore(
            launch.master_addr,
            port,
            launch.world_size,
            True,
            timeout=timedelta(seconds=connect_timeout),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except Exception as exc:
        text = _first_line(exc)
        in_use = "EADDRINUSE" in text or "already in use" in text.lower()
        if in_use and launch.job_key:
            raise _init_error(
                launch,
                f"port collision: the port {port} derived from job {launch.job_key!r} is already in use on this "
                "host (another job derived the same port, or another program holds it)",
                _COLLISION_FIX,
            ) from exc
        if in_use:
            raise _init_error(
                launch,
                f"MASTER_PORT={port} is already in use on this host (another job, or a "
                "previous run that still holds it)",
                "choose another MASTER_PORT (torchrun "
                f"--master_port), or stop the process holding it (`ss -ltnp | grep {port}`)",
            ) from exc
        raise _init_error(
            launch,
            f"cannot open the rendezvous on MASTER_PORT={port}: {text}",
            "choose another MASTER_PORT, or check that this host may listen on it",
        ) from exc
    if launch.job_key:
        store.set(_JOB, launch.job_key)  # clients check it before they count themselves in
    try:
        store.wait([_ALL_JOINED], timedelta(seconds=connect_timeout))
    except Exception:  # torch raises its own timeout error (the type varies by version)
        joined = store.add(_JOINED, 0)
        raise _init_error(
            launch,
            f"not every rank reached the rendezvous on MASTER_PORT={port} within "
            f"connect_timeout={connect_timeout:g}s ({joined + 1}/{launch.world_size} ranks "
            "joined, rank 0 included)",
            f"start all {launch.world_size} ranks with the same MASTER_ADDR/MASTER_PORT; check their logs; "
            "raise connect_timeout if they start far apart",
        ) from None
    for key in (_JOINED, _ALL_JOINED):  # a later group on this port (multi_tenant) counts afresh
        store.delete_key(key)
    return store


_MPI_LAUNCHERS = ("openmpi", "mvapich", "mpich")
_HYDRA_PROXIES = ("hydra_pmi_proxy", "pmi_proxy")  # MPICH's and Intel MPI's per-node proxy


def _hydra_job_key() -> str | None:
    """MPICH's hydra names no job in the environment; its per-node proxy, an ancestor of every rank of the job
    on this node, does: the pid and start time of the nearest proxy above this process (Linux /proc)."""
    pid = os.getppid()
    for _ in range(32):  # ranks are started by the proxy, maybe through a shell or two
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm in _HYDRA_PROXIES:
            return f"mpich:{comm}-{pid}-{fields[19]}"  # fields[19] is starttime (field 22 of proc(5))
        pid = int(fields[1])  # the parent (field 4)
        if pid <= 1:
            return None
    return None


def _host_address() -> str:
    """This host's address for the other nodes: its first non-loopback IPv4 address, else its name."""
    name = socket.gethostname()
    try:
        addrs = [a for a in socket.gethostbyname_ex(name)[2] if not a.startswith("127.")]
    except OSError:
        addrs = []
    return addrs[0] if addrs else name


def _mpi4py_rendezvous(launch: LaunchEnv) -> LaunchEnv | None:
    """Rank 0's address and a free port on it, broadcast over MPI (mpi4py); None when mpi4py is missing."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (launch.rank, launch.world_size):
        raise _init_error(
            launch,
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()}, not the launcher's "
            f"{launch.rank} of {launch.world_size} (mpi4py built against another MPI than the one that launched)",
            "reinstall mpi4py against this launcher's MPI (pip install --no-binary mpi4py mpi4py), or export "
            "MASTER_ADDR and MASTER_PORT to every rank",
        )
    mine = None
    if launch.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = _host_address()
        mine = (addr, port, f"{launch.launcher}:mpi4py:{addr}:{port}:{os.getpid()}")
    addr, port, key = comm.bcast(mine, root=0)
    return replace(launch, master_addr=addr, master_port=port, job_key=key)


def _mpi_rendezvous(launch: LaunchEnv) -> LaunchEnv:
    """MPI without MASTER_*: on one node, loopback and the job's port; else rank 0's address over mpi4py.

    ``RATLIB_MPI_RENDEZVOUS=mpi4py`` takes the mpi4py way on one node too (it is how the tests cover it).
    """
    if launch.launcher not in _MPI_LAUNCHERS or launch.world_size == 1:
        return launch
    if launch.master_addr or launch.master_port:
        if launch.job_key is None or os.environ.get("RATLIB_MPI_RENDEZVOUS") != "mpi4py":
            return launch  # given by hand (a half-set pair is _make_store's error), or derived from the job
    one_node = launch.local_world_size == launch.world_size
    if one_node and os.environ.get("RATLIB_MPI_RENDEZVOUS") != "mpi4py":
        key = _hydra_job_key() if launch.launcher == "mpich" else None
        if key is not None:
            return replace(launch, master_addr="127.0.0.1", master_port=job_port(key), job_key=key)
    shared = _mpi4py_rendezvous(launch)
    if shared is not None:
        return shared
    where = "one node, with no job id to derive a port from" if one_node else "several nodes"
    raise _init_error(
        launch,
        f"MASTER_ADDR and MASTER_PORT not set for a {launch.world_size}-process {launch.launcher} job on {where}",
        "export MASTER_ADDR (rank 0's host) and MASTER_PORT (free there) to every rank (mpirun -x MASTER_ADDR "
        "-x MASTER_PORT), or pip install 'ratlib[mpi]' to share them over MPI",
    )


def _make_store(launch: LaunchEnv, connect_timeout: float, timeout: timedelta) -> Any:
    """The rendezvous store, built so that set-up fails within ``connect_timeout`` instead of waiting for
    the whole process-group ``timeout``; the store then gets ``timeout`` for everything after."""
    missing = [name for name, value in zip(_MASTER, (launch.master_addr, launch.master_port)) if not value]
    if missing:
        names = " and ".join(missing)
        raise _init_error(
            launch,
            f"{names} not set for a {launch.world_size}-process job",
            f"export {names} (rank 0's host and a free port on it), or launch with torchrun",
        )
    if launch.rank == 0 and not _uses_agent_store(launch):
        store = _server_store(launch, connect_timeout)
    else:
        store = _client_store(launch, time.monotonic() + connect_timeout, connect_timeout)
    store.set_timeout(timeout)
    return store


def _resolve_device(device: str, launch: LaunchEnv) -> torch.device:
    """The rank's device; on CUDA it is made current before init (else every rank lands on GPU 0)."""
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise DistInitArgumentError(message(f"init_distributed: device={device!r}", expected="'auto', 'cuda' or 'cpu'"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise _init_error(
            launch,
            "device='cuda' but torch.cuda.is_available() is False",
            "pass device='cpu' (with backend='gloo'), or install a CUDA build of torch",
        )
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise _init_error(
            launch,
            f"local rank {launch.local_rank} has no GPU: {count} visible (CUDA_VISIBLE_DEVICES={visible})",
            f"start at most {count} processes per node (torchrun --nproc_per_node={count}), or "
            "make more GPUs visible (CUDA_VISIBLE_DEVICES)",
        )
    dev = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(dev)
    return dev


def _check_backend(backend: str, dev: torch.device, launch: LaunchEnv) -> None:
    dist = _torch_dist()
    if backend == "nccl" and dev.type != "cuda":
        raise _init_error(
            launch,
            f"backend='nccl' needs CUDA, but the device is {dev}",
            "use backend='gloo' on CPU (or leave backend=None to choose), or run on GPUs",
        )
    available = getattr(dist, f"is_{backend}_available", None)
    if not dist.is_available() or (available is not None and not available()):
        raise _init_error(
            launch,
            f"backend={backend!r} is not available in this torch build",
            "leave backend=None to choose, or install a torch build with that backend",
        )


def _adopt_group(launch: LaunchEnv, dev: torch.device) -> DistInfo:
    """DistInfo for a group someone else created: the group's rank, size and backend are the truth."""
    dist = sys.modules["torch.distributed"]
    return DistInfo(
        dist.get_rank(),
        dist.get_world_size(),
        launch.local_rank,
        launch.local_world_size,
        launch.node_rank,
        launch.launcher,
        str(dist.get_backend()),
        dev,
        launch.master_addr,
        launch.master_port,
    )


CONNECT_TIMEOUT_ENV = "RATLIB_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 120.0


def _connect_timeout(given: float | None) -> float:
    """The rendezvous bound: the argument, else ``RATLIB_CONNECT_TIMEOUT``, else 120 s (set in the job's
    environment when ranks start minutes apart, without touching the script)."""
    if given is not None:
        return given
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        return float(text)
    except ValueError as exc:
        raise DistInitArgumentError(
            message(f"{CONNECT_TIMEOUT_ENV}={text!r} is not a number of seconds", fix=f"e.g. {CONNECT_TIMEOUT_ENV}=600")
        ) from exc


def init_distributed(
    backend: str | None = None,
    *,
    timeout: float | timedelta = timedelta(minutes=30),
    connect_timeout: float | None = None,
    device: str = "auto",
    stall_timeout: float | None = None,
    check_collectives: bool = False,
) -> DistInfo:
    """Set up the process group from the launcher's environment and return this rank's ``DistInfo``.

    Backend nccl with CUDA, else gloo (an explicit choice wins). On CUDA the rank is pinned to
    ``cuda:LOCAL_RANK`` before initialising. The rendezvous fails within ``connect_timeout`` seconds
    (rank 0 waits that long for the others to join, the others that long to reach rank 0) instead of
    the process-group ``timeout``, which then bounds every later collective. A single process creates
    no group. Idempotent: a second call returns the same ``DistInfo``. ``stall_timeout`` and
    ``check_collectives`` call ``ratlib.hang.install`` once the group exists. ``connect_timeout=None``:
    ``RATLIB_CONNECT_TIMEOUT`` (seconds) if set, else 120.
    """
    global _INFO, _INIT_ARGS, _ATEXIT_REGISTERED
    connect_timeout = _connect_timeout(connect_timeout)
    td = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if td.total_seconds() <= 0 or not connect_timeout > 0:
        raise DistInitArgumentError(
            message(
                f"init_distributed: timeout={timeout!r}, connect_timeout={connect_timeout!r}; both must be positive",
                expected="seconds > 0, or a timedelta for timeout",
            )
        )
    if backend is not None and backend not in _BACKENDS:
        raise DistInitArgumentError(
            message(f"init_distributed: backend={backend!r}", expected=f"one of {_BACKENDS}, or None to choose")
        )
    args = {
        "backend": backend,
        "timeout": td,
        "connect_timeout": connect_timeout,
        "device": device,
        "stall_timeout": stall_timeout,
        "check_collectives": check_collectives,
    }
    if _INFO is not None and (_INFO.world_size == 1 or _group_ready()):
        if args != _INIT_ARGS:
            warnings.warn(
                f"init_distributed called again with different arguments {args} (first call: "
                f"{_INIT_ARGS}); the first call's set-up stays in force",
                stacklevel=2,
            )
        return _INFO
    launch = detect_launch_env()
    dev = _resolve_device(device, launch)
    chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend is not None or launch.world_size > 1:
        _check_backend(chosen, dev, launch)
    if _group_ready():
        info = _adopt_group(launch, dev)
    else:
        if launch.world_size > 1:
            launch = _mpi_rendezvous(launch)
            store = _make_store(launch, connect_timeout, td)
            dist = _torch_dist()
            kwargs: dict[str, Any] = {
                "backend": chosen,
                "store": store,
                "rank": launch.rank,
                "world_size": launch.world_size,
                "timeout": td,
            }
            if chosen == "nccl" and "device_id" in _init_parameters(dist):
                kwargs["device_id"] = dev
            try:
                dist.init_process_group(**kwargs)
            except Exception as exc:
                raise _init_error(
                    launch,
                    f"init_process_group(backend={chosen!r}) failed after the rendezvous at "
                    f"{launch.master_addr}:{launch.master_port}: {type(exc).__name__}: "
                    f"{_first_line(exc)}",
                    f"all ranks must agree on MASTER_ADDR, MASTER_PORT and WORLD_SIZE, and start within timeout={td}",
                ) from exc
            if _node_index_unknown(launch):
                launch = replace(launch, node_rank=_node_from_hosts(launch))
        info = DistInfo(
            launch.rank,
            launch.world_size,
            launch.local_rank,
            launch.local_world_size,
            launch.node_rank,
            launch.launcher,
            chosen if launch.world_size > 1 else None,
            dev,
            launch.master_addr,
            launch.master_port,
        )
    _INFO, _INIT_ARGS = info, args
    if not _ATEXIT_REGISTERED:
        atexit.register(shutdown)
        _ATEXIT_REGISTERED = True
    if stall_timeout is not None or check_collectives:
        if _HANG_INSTALL is None:  # pragma: no cover - ratlib/__init__.py registers it
            raise DistInitError(
                message("init_distributed: stall_timeout/check_collectives need ratlib.hang", fix="import ratlib.hang")
            )
        _HANG_INSTALL(stall_timeout=stall_timeout, check_collectives=check_collectives)
    return info


# ratlib.hang sits above this module, so this module never imports it: hang registers its installer here.
_HANG_INSTALL: Callable[..., None] | None = None


def set_hang_install(install: Callable[..., None] | None) -> None:
    """Hook for ``ratlib.hang``: what ``init_distributed(stall_timeout=..., check_collectives=...)`` calls."""
    global _HANG_INSTALL
    _HANG_INSTALL = install


def _node_index_unknown(launch: LaunchEnv) -> bool:
    """No launcher variable names this node's index (MPI, RANK/WORLD_SIZE by hand) and the job may span nodes."""
    given = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
    if launch.launcher == "kubeflow" or any(name in launch.variables for name in given):
        return False
    guessed_one_node = launch.launcher == "env" and "LOCAL_WORLD_SIZE" not in launch.variables
    return guessed_one_node or launch.local_world_size != launch.world_size


def _node_index(hosts: list[str], rank: int) -> int:
    """The index of ``hosts[rank]`` among the distinct hosts ordered by the lowest rank on each."""
    return list(dict.fromkeys(hosts)).index(hosts[rank])


def _node_from_hosts(launch: LaunchEnv) -> int:
    """This node's index from every rank's host name (one all_gather_object, once the group exists)."""
    dist = _torch_dist()
    hosts: list[Any] = [None] * launch.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    return _node_index([str(h) for h in hosts], launch.rank)


def _init_parameters(dist: Any) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(dist.init_process_group).parameters)


def shutdown() -> None:
    """Destroy every process group if one exists; safe to call any number of times (also runs at exit).

    A group whose Python object is still referenced keeps its gloo threads after ``destroy_process_group``;
    freed later, during interpreter shutdown, it can abort the process ("terminate called without an active
    exception") after training has finished. So: collect garbage (DDP models and pending work in cycles), let
    DeepSpeed drop its own references to its groups (it keeps a WORLD copy in ``deepspeed.utils.groups``), and
    collect again, so that the groups and their threads go now, while the interpreter is still whole.
    """
    global _INFO, _INIT_ARGS
    if _group_ready():
        gc.collect()
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if (
            ds_comm is not None
            and getattr(ds_comm, "cdb", None) is not None
            and hasattr(ds_comm, "destroy_process_group")
        ):
            ds_comm.destroy_process_group()  # torch's destroy, then DeepSpeed releases its group references
        else:
            sys.modules["torch.distributed"].destroy_process_group()
        gc.collect()
    _INFO, _INIT_ARGS = None, None


@contextlib.contextmanager
def distributed(backend: str | None = None, **kwargs: Any) -> Iterator[DistInfo]:
    """``init_distributed`` for the block, and teardown always: on normal exit and on an exception.

    An exception on one rank is logged with its rank before the group goes; the other ranks then fail
    in their next collective (at the latest after ``timeout``) instead of waiting forever.
    """
    info = init_distributed(backend, **kwargs)
    try:
        yield info
    except (Exception, KeyboardInterrupt) as exc:
        _log_failure(info, exc)
        raise
    finally:
        shutdown()


def _log_failure(info: DistInfo, exc: BaseException) -> None:
    """Report ``exc`` before the group goes (a teardown that hangs would otherwise hide it), message first,
    once: the excepthook of ``setup_logging`` then leaves it alone, and a ``RatlibError``'s traceback goes to
    the rank's log file when there is one."""
    text = "%s on rank %d/%d inside distributed(), tearing down the process group: %s"
    try:
        from ratlib.rank_logger import _report_exception
    except ImportError:
        print(text % (type(exc).__name__, info.rank, info.world_size, exc), file=sys.stderr)
        return
    _report_exception(
        "ratlib.dist_init", logging.ERROR, text, type(exc).__name__, info.rank, info.world_size, exc, exc=exc
    )


# ----------------------------------------------------------------------------------------------
# Rank helpers: correct before init (from the launcher), with a group, and after teardown.
# get_rank, get_world_size and is_main_process are ratlib.launch's (imported above): one definition.


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not _group_ready():
        return
    dist = sys.modules["torch.distributed"]
    if dist.get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main rank runs the block first (download, preprocessing); the others wait, then run it.

    If the main rank raises inside the block, the others are not let in: they fail in their barrier
    once the main rank's group goes (``distributed()`` teardown, or exit), not after racing it.
    """
    main = is_main_process()
    if not main:
        barrier()
    yield
    if main:
        barrier()

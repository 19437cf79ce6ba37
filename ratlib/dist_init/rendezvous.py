"""The rendezvous store behind ``init_distributed``: built so that set-up fails within ``connect_timeout``
(rank 0's server, the other ranks' clients, a job tag against port collisions), and the MPI launchers'
master address and port where the launcher sets none.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratlib.errors import MissingDependencyError, message
from ratlib.launch import (
    _MASTER,
    DistInitError,
    LaunchEnv,
    job_port,
    launch_error,
)

if TYPE_CHECKING:  # pragma: no cover
    pass


def _torch_dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError(message("ratlib.dist_init needs torch", fix="pip install torch")) from exc
    return dist


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

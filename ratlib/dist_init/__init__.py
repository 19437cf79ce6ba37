"""Process-group set-up and teardown, rank helpers; re-exports launcher detection from ``ratlib.launch``.

``init_distributed`` pins the rank to its GPU, checks that the rendezvous is
reachable before it blocks, and turns every failure into a ``DistInitError`` that names the launcher,
the variables, the rank, the cause and the fix. Torch is imported only inside the functions that need it.
The rendezvous store (and the MPI launchers' address and port) is built in ``rendezvous``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ratlib.dist_init.rendezvous import _first_line, _init_error, _make_store, _mpi_rendezvous, _torch_dist
from ratlib.errors import message
from ratlib.launch import (
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
)

_group_ready = group_is_up  # the one definition is ratlib.launch's

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DistInfo",
    "DistInitError",
    "LaunchEnv",
    "barrier",
    "before_shutdown",
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
# Called first by shutdown(), by higher layers that must finish with the group (an asynchronous checkpoint save)
_BEFORE_SHUTDOWN: list[Callable[[], None]] = []
_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl")


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
    first: BaseException | None = None
    for hook in list(_BEFORE_SHUTDOWN):
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - the group still goes down; the first error is raised after
            first = first or exc
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
    if first is not None:
        raise first


def before_shutdown(hook: Callable[[], None]) -> None:
    """Register ``hook`` (once) to run at the start of every ``shutdown()``, before the group goes: how a higher
    layer finishes what needs the group (``ratlib.checkpoint`` waits for an asynchronous save there). An error
    of a hook is raised after the teardown."""
    if hook not in _BEFORE_SHUTDOWN:
        _BEFORE_SHUTDOWN.append(hook)


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

"""Run a script or a module-level function on N real ranks (gloo on 127.0.0.1).

Every distributed test in ratlib (and downstream, through the ``run_on_ranks`` pytest
fixture) goes through :func:`run_on_ranks`: one subprocess per rank, the launcher's
variables set as torchrun (or SLURM, Open MPI) would set them, a free port per run, and
one deadline for the whole run, after which every rank still alive is killed and named
in the result instead of freezing the test session. Needs neither pytest nor torch.
"""

from __future__ import annotations

import base64
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ratlib.errors import message
from ratlib.testing._errors import RankRunError, RankRunFailedError, RankScriptNotFoundError

__all__ = ["RankRun", "run_on_ranks", "free_port", "LAUNCHER_VARIABLE_PREFIXES"]

# Variables of a surrounding launcher that must not leak into the ranks we start.
LAUNCHER_VARIABLE_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_", "MV2_", "HYDRA_")
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "NODE_RANK",
    "LOCAL_SIZE",
)

Target = Union[str, "os.PathLike[str]", Callable[..., Any]]  # noqa: UP007  (a runtime alias: "|" on strings fails)
EnvSpec = Union[Mapping[str, "str | None"], Callable[[int], Mapping[str, "str | None"]], None]  # noqa: UP007

_BOOTSTRAP = """\
import base64, importlib, pickle, sys
_mod, _qual, _payload = sys.argv[1], sys.argv[2], sys.argv[3]
_obj = importlib.import_module(_mod)
for _part in _qual.split("."):
    _obj = getattr(_obj, _part)
_args = pickle.loads(base64.b64decode(_payload))
_rv = _obj(*_args)
sys.exit(_rv if isinstance(_rv, int) and not isinstance(_rv, bool) else 0)
"""


@dataclass
class RankRun:
    """What each rank did: exit codes, output and whether the run hit its deadline."""

    world_size: int
    returncodes: list[int | None]  # None: the rank was still running at the deadline and was killed
    stdouts: list[str]
    stderrs: list[str]
    timed_out: bool
    duration: float
    port: int
    hung_ranks: list[int] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        """stdout followed by stderr, by rank."""
        return [o + e for o, e in zip(self.stdouts, self.stderrs)]

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def check(self) -> RankRun:
        """Raise ``RankRunFailedError`` (an ``AssertionError``) with every rank's output unless all ranks
        exited 0 in time."""
        if not self.ok:
            raise RankRunFailedError(message("RankRun.check: not every rank exited 0 in time", got=str(self)))
        return self

    def __str__(self) -> str:
        head = f"RankRun(world_size={self.world_size}, returncodes={self.returncodes}, timed_out={self.timed_out}"
        head += f", hung_ranks={self.hung_ranks}, duration={self.duration:.1f}s)"
        parts = [head]
        for r in range(self.world_size):
            parts.append(f"--- rank {r} stdout ---\n{self.stdouts[r][-4000:]}")
            parts.append(f"--- rank {r} stderr ---\n{self.stderrs[r][-4000:]}")
        return "\n".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _launcher_env(launcher: str, rank: int, world_size: int, port: int) -> dict[str, str]:
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "torchrun":
        return {
            **common,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0",
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world_size),
            "GROUP_WORLD_SIZE": "1",
        }
    if launcher == "slurm":
        return {
            **common,
            "SLURM_JOB_ID": "4242",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(world_size),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_NNODES": "1",
            "SLURM_TASKS_PER_NODE": str(world_size),
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_STEP_NUM_TASKS": str(world_size),
        }
    if launcher == "openmpi":
        return {
            **common,
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": str(world_size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(world_size),
            "OMPI_COMM_WORLD_NODE_RANK": "0",
        }
    if launcher == "none":
        return common
    raise RankRunError(
        message(f"run_on_ranks: launcher={launcher!r}", expected="one of 'torchrun', 'slurm', 'openmpi', 'none'")
    )


def _module_root(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = Path(path).resolve().parent
    for _ in range(module_name.count(".")):
        root = root.parent
    return str(root)


def _command(target: Target, args: Sequence[Any], python: str) -> tuple[list[str], str | None]:
    """The command line for one rank, and a folder to put on PYTHONPATH (function targets)."""
    if callable(target):
        module, qualname = target.__module__, target.__qualname__
        if module == "__main__" or "<locals>" in qualname:
            raise RankRunError(
                message(
                    f"run_on_ranks: {qualname} must be a module-level function in an importable module",
                    got=f"module {module!r}",
                    fix="move it to a module, or pass a script path",
                )
            )
        payload = base64.b64encode(pickle.dumps(tuple(args))).decode()
        return [python, "-c", _BOOTSTRAP, module, qualname, payload], _module_root(module)
    text = os.fspath(target)
    if text.endswith(".py") or os.path.exists(text):
        if not os.path.isfile(text):
            raise RankScriptNotFoundError(message(f"run_on_ranks: script {text!r} does not exist"))
        return [python, text, *map(str, args)], None
    if ":" in text:  # "package.module:function"
        module, qualname = text.split(":", 1)
        payload = base64.b64encode(pickle.dumps(tuple(args))).decode()
        return [python, "-c", _BOOTSTRAP, module, qualname, payload], None
    raise RankRunError(
        message(
            f"run_on_ranks: target {text!r} cannot be run",
            expected="a script path, a 'module:function' string or a callable",
        )
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            continue


def run_on_ranks(
    target: Target,
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    env: EnvSpec = None,
    timeout: float = 60,
    launcher: str = "torchrun",
    cwd: str | os.PathLike[str] | None = None,
    python: str | None = None,
) -> RankRun:
    """Start ``world_size`` processes running ``target`` and wait for all of them, at most ``timeout`` s.

    ``target`` is a script path (run with ``args`` as its command line), a module-level function
    (called as ``target(*args)`` in each rank; an int return value is the exit code) or a
    ``"module:function"`` string. Each rank gets the variables ``launcher`` would set
    (``"torchrun"``: RANK, WORLD_SIZE, LOCAL_RANK, ...; ``"slurm"``: SLURM_PROCID, SLURM_NTASKS, ...;
    ``"openmpi"``; ``"none"``: only ``env``), MASTER_ADDR=127.0.0.1 and a free MASTER_PORT.
    ``env`` adds variables (a value of None removes one), or is a function of the rank giving them.
    Ranks still running at the deadline are killed and listed in ``RankRun.hung_ranks``.
    """
    if world_size < 1:
        raise RankRunError(message(f"run_on_ranks: world_size={world_size}", expected="at least 1"))
    python = python or sys.executable
    cmd, extra_path = _command(target, args, python)
    port = free_port()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_VARIABLE_PREFIXES)
    }
    base.setdefault("PYTHONUNBUFFERED", "1")
    base.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if extra_path:
        base["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, base.get("PYTHONPATH")) if p)

    procs: list[subprocess.Popen[bytes]] = []
    files: list[tuple[Any, Any]] = []
    start = time.monotonic()
    try:
        for rank in range(world_size):
            rank_env = dict(base)
            rank_env.update(_launcher_env(launcher, rank, world_size, port))
            extra = env(rank) if callable(env) else (env or {})
            for key, value in extra.items():
                if value is None:
                    rank_env.pop(key, None)
                else:
                    rank_env[key] = str(value)
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            files.append((out, err))
            procs.append(
                subprocess.Popen(
                    cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=rank_env, cwd=cwd, start_new_session=True
                )
            )
        deadline = start + timeout
        timed_out = False
        for proc in procs:
            remaining = deadline - time.monotonic()
            try:
                proc.wait(timeout=max(remaining, 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
        for r in hung:
            _kill_group(procs[r])
        duration = time.monotonic() - start
        stdouts, stderrs = [], []
        for out, err in files:
            out.seek(0)
            err.seek(0)
            stdouts.append(out.read().decode("utf-8", "replace"))
            stderrs.append(err.read().decode("utf-8", "replace"))
        returncodes = [None if r in hung else p.returncode for r, p in enumerate(procs)]
        return RankRun(world_size, returncodes, stdouts, stderrs, timed_out or bool(hung), duration, port, hung)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
        for out, err in files:
            out.close()
            err.close()

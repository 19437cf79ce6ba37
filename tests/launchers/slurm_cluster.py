"""A two-node Slurm cluster on this host, for tests: munged, one slurmctld and two slurmd (n1, n2).

Every file lives in one temporary directory; the daemons are started here and stopped here by pid, so a
Slurm or munge that the machine runs anyway is left alone. Needs root (slurmd runs as root), Debian's
``slurm-wlm`` and ``munge`` packages, and /etc/hosts entries for n1 and n2 (added when missing).

Run ``python tests/launchers/slurm_cluster.py`` to bring one up by hand; it prints the environment to use
and stops the daemons on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SLURM_TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "srun", "sbatch", "sinfo", "scontrol", "scancel")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
# AuthInfo cred_expire: also how long a requeued job waits (Reason=BeginTime) before it may start again; 120 s by
# default, which would make every requeue test wait two minutes
CRED_EXPIRE = 10


class ClusterError(RuntimeError):
    """The local cluster did not come up; the message carries the daemons' last log lines."""


def missing_tools() -> list[str]:
    """Slurm/munge programs not found on PATH (or in /usr/sbin, where Debian puts the daemons)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [tool for tool in SLURM_TOOLS if shutil.which(tool, path=path) is None]


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    if found is None:
        raise ClusterError(f"{name} not found")
    return found


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def ensure_hosts(names: tuple[str, ...] = NODES) -> None:
    """Make ``names`` resolve to 127.0.0.1 (srun's node list names them; ratlib's MASTER_ADDR is n1)."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open("/etc/hosts", "a") as fh:
            fh.write(f"127.0.0.1 {' '.join(missing)}  # ratlib tests: local Slurm cluster\n")


@dataclass
class SlurmCluster:
    """A running local cluster: ``env`` is what srun/sbatch/scancel/scontrol/sinfo need (SLURM_CONF)."""

    root: Path
    conf: Path
    env: dict[str, str]
    nodes: tuple[str, ...] = NODES
    pids: dict[str, int] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command (``srun``, ``sbatch``, ...) against this cluster."""
        return subprocess.run(
            [_tool(args[0]), *args[1:]], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def logs(self, lines: int = 20) -> str:
        out = []
        for log in sorted([*(self.root / "log").glob("*.log"), *(self.root / "munge").glob("*.log")]):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons this cluster started, by pid (slurmd first, munged last)."""
        for name in sorted(self.pids, key=lambda n: (n == "munged", n == "slurmctld")):
            pid = self.pids[name]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in self.pids.values():
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pids.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def _read_pid(path: Path, deadline: float, what: str, cluster: SlurmCluster) -> int:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip()
            if text:
                return int(text)
        time.sleep(0.05)
    raise ClusterError(f"{what} wrote no pid file {path} in time\n{cluster.logs()}")


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int], munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} CPUs={CPUS_PER_NODE} State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""\
ClusterName=ratlibtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=5
SchedulerType=sched/backfill
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def start_cluster(root: Path, timeout: float = 60.0) -> SlurmCluster:
    """Bring up munged, slurmctld and two slurmd under ``root``; return once ``sinfo`` shows both idle."""
    if os.geteuid() != 0:
        raise ClusterError("the local Slurm cluster needs root (slurmd runs as root)")
    ensure_hosts()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool/n1", "spool/n2", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_dir = root / "munge"
    munge_dir.mkdir(exist_ok=True)
    munge_user = pwd.getpwnam("munge")
    key, sock = munge_dir / "munge.key", munge_dir / "munge.socket"
    subprocess.run([_tool("mungekey"), "--create", "--keyfile", str(key), "--force"], check=True, capture_output=True)
    for path in (munge_dir, key):
        os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
    os.chmod(key, 0o600)
    os.chmod(munge_dir, 0o755)  # clients (root, the tests) must reach the socket
    os.chmod(root, 0o755)  # munged checks that the directories above its socket are not writable by others
    ports = _free_ports(3)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, ports[0], ports[1:], sock))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in list(env):  # a test run inside a Slurm job must not leak that job into this cluster
        if name.startswith("SLURM_") and name != "SLURM_CONF":
            del env[name]
    cluster = SlurmCluster(root, conf, env)
    deadline = time.monotonic() + timeout
    try:
        subprocess.run(
            [
                "setpriv",
                f"--reuid={munge_user.pw_uid}",
                f"--regid={munge_user.pw_gid}",
                "--clear-groups",
                _tool("munged"),
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        cluster.pids["munged"] = _read_pid(munge_dir / "munged.pid", deadline, "munged", cluster)
        subprocess.run([_tool("slurmctld"), "-f", str(conf)], env=env, check=True, capture_output=True, timeout=30)
        cluster.pids["slurmctld"] = _read_pid(root / "run" / "slurmctld.pid", deadline, "slurmctld", cluster)
        for name in NODES:
            subprocess.run(
                [_tool("slurmd"), "-f", str(conf), "-N", name], env=env, check=True, capture_output=True, timeout=30
            )
            cluster.pids[f"slurmd-{name}"] = _read_pid(root / "run" / f"slurmd-{name}.pid", deadline, name, cluster)
        while True:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=10).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in NODES):
                return cluster
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes not idle after {timeout:g}s: {states}\n{cluster.logs()}")
            time.sleep(0.2)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ClusterError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        cluster.stop()
        raise ClusterError(f"local Slurm cluster did not start: {exc}\n{detail}\n{cluster.logs()}") from exc


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":  # pragma: no cover - a manual aid
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ratlib-slurm-") as tmp, slurm_cluster(Path(tmp)) as c:
        print(f"export SLURM_CONF={c.conf}")
        print(c.run("sinfo").stdout)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()

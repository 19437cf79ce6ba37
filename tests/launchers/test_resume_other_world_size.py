"""A run that loses ranks resumes by itself on fewer, with the global batches of an uninterrupted run (issue 32):
``torchrun --nnodes 1:2 --max-restarts 1`` with one of its two agents killed, and a Slurm job of 2 tasks stopped
by a signal and requeued with 1 task.

Both run the segmentation example with ``training.global_batch_size`` through logged_example.py, which logs
every micro-batch each rank draws; the test puts each launch's global batches together and compares them, index
by index, with an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launcher_helpers import ROOT, clean_env
from logged_example import global_batches, reference_batches

from ratlib.preempt import PREEMPT_EXIT_CODE
from ratlib.synthetic import make_msd_segmentation
from ratlib.testing import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]

LOGGED = Path(__file__).with_name("logged_example.py")
CONFIG = ROOT / "examples" / "segmentation" / "config.yaml"
SAMPLES, GLOBAL_BATCH, EPOCHS, SEED = 48, 16, 3, 0  # 3 global steps an epoch, 9 in all
# instance norm: nothing depends on how a global batch is split over ranks; a checkpoint at each epoch's end
ARGS = [
    f"data.limit={SAMPLES}",
    f"training.num_epochs={EPOCHS}",
    f"training.global_batch_size={GLOBAL_BATCH}",
    "training.batch_size=8",
    f"training.seed={SEED}",
    "model.norm=instance",
    "data.num_workers=0",
    "training.log_every=1",
    "checkpoint.keep=null",
]


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_msd_segmentation(tmp_path_factory.mktemp("msd") / "Task99_Synthetic", 8, (64, 64, 16), 3, seed=0)


def _example(run: Path, root: Path, *extra: str) -> list[str]:
    cmd = [str(LOGGED), "segmentation", "--config", str(CONFIG), f"output_dir={run}", f"data.root={root}"]
    return [*cmd, *ARGS, *extra]


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _drawn(batches: Path, step: tuple[int, int]) -> bool:
    """Whether a rank of the first launch drew a micro-batch of (epoch, step) yet (a line may be half written)."""
    try:
        return step in global_batches(batches, 0)
    except ValueError:
        return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: Linux only, as the launcher tests are)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


# ----------------------------------------------------------------------------------------------
# torchrun --nnodes 1:2: one agent (and its worker) killed; the other restarts alone and resumes


def test_torchrun_nnodes_1_2_survivor_restarts_on_one_rank_and_resumes_the_global_batches(
    tmp_path: Path, msd_root: Path
) -> None:
    """Two torchrun agents (one worker each, a c10d rendezvous on 127.0.0.1, one rdzv id), ``training.resume=auto``.
    Once epoch 1 starts (after epoch 0's checkpoint) agent B's process group and its worker's get SIGKILL, as
    when a node goes away. Agent A's worker fails in its next collective; A restarts it (``--max-restarts 1``), the
    rendezvous closes with A alone (``--nnodes 1:2``), and the new worker, world size 1, takes the latest
    checkpoint: the global batches from there on are the uninterrupted run's, each step is tracked once."""
    run, batches = tmp_path / "run", tmp_path / "batches"
    batches.mkdir()
    port = free_port()
    env = clean_env(BATCH_LOG=str(batches), GLOO_SOCKET_IFNAME="lo")

    def agent(name: str, host: bool) -> subprocess.Popen:
        # both agents join the first round (it closes at 2 nodes at once); after the kill, the dead node misses its
        # keep-alives (every 5 s, 3 misses: torch's defaults, which a loaded machine still keeps) and the round
        # closes with the survivor 10 s after it joined (last_call_timeout; 30 s by default)
        conf = f"is_host={str(host).lower()},last_call_timeout=10"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1"]
        cmd += ["--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
        cmd += ["--rdzv-id", "issue32", "--rdzv-conf", conf, *_example(run, msd_root, "training.resume=auto")]
        out = open(tmp_path / f"agent_{name}.txt", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    # started together, so that the first round has both (one started later would make the first round close
    # with one node and then restart it to scale up); B's store client waits for A's server
    a = agent("a", host=True)  # holds the rendezvous store: the agent that stays
    b = agent("b", host=False)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 420
        while not killed and time.monotonic() < deadline and a.poll() is None:
            if (run / "checkpoints" / "epoch0000.pt").is_file() and _drawn(batches, (1, 0)):
                for group in {b.pid, *(os.getpgid(w) for w in _children(b.pid))}:  # the agent's group, each worker's
                    os.killpg(group, signal.SIGKILL)
                    killed.append(group)
            time.sleep(0.1)
        a.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = (tmp_path / "agent_a.txt").read_text()
    assert killed, "the run ended before agent B could be killed mid-epoch 1:\n" + text[-4000:]
    assert a.returncode == 0, text[-6000:]
    # the restart: world size 1, from the last checkpoint (the end of epoch 0)
    assert re.search(r"resumed from .*epoch0000\.pt", text), text[-6000:]
    assert "1 ranks x batch 8 x accumulation 2 = global batch 16" in text, text[-6000:]
    first, second = global_batches(batches, 0), global_batches(batches, 1)
    whole = reference_batches(SAMPLES, GLOBAL_BATCH, SEED, EPOCHS)
    assert min(second) == (1, 0) and max(second) == (2, 2), list(second)  # epoch 1 again, from its start
    assert second == {k: v for k, v in whole.items() if k >= (1, 0)}  # index by index
    assert all(whole[k] == v for k, v in first.items() if k < (1, 0))  # before the kill, on 2 ranks
    assert len(list(batches.glob("batches*.0.jsonl"))) == 2  # two ranks before the kill
    assert len(list(batches.glob("batches*.1.jsonl"))) == 1  # one rank after the restart
    assert _steps(run) == list(range(1, 10))  # each step once: the steps after the checkpoint were purged
    final = _checkpoint(run / "checkpoints" / "epoch0002.pt")
    assert final["step"] == 9 and final["sampler"]["world_size"] == 1


# ----------------------------------------------------------------------------------------------
# Slurm: a job of 2 tasks preempted (exit 75), requeued, and started again with 1 task


def _job(cluster, job: str) -> dict[str, str]:
    done = cluster.run("scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _wait(what: str, ready, timeout: float, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s\n{out.read_text()[-6000:] if out.exists() else ''}")
        time.sleep(0.1)


def _scontrol(cluster, *args: str) -> None:
    done = cluster.run("scontrol", *args)
    assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr}"


def test_a_slurm_job_requeued_with_fewer_tasks_resumes_the_same_global_batches(
    slurm_cluster, tmp_path: Path, msd_root: Path
) -> None:
    """sbatch -N2 -n2 --requeue, ``srun`` in the script (a task per node the job got), ``training.resume=auto``.
    ``scancel --signal=USR1`` mid-epoch 1: both ranks stop at one step, write the checkpoint and exit 75, and
    rank 0 requeues the job. While it waits to start again (Slurm's BeginTime) the test holds it and makes it
    a job of 1 node (``scontrol update NumNodes=1-1 NumTasks=1 NumCPUs=1``), as when the partition has fewer
    free nodes; released, it starts with 1 rank, resumes from the stop's checkpoint, and the global batches
    from there on are the uninterrupted run's, index by index; each step is tracked once."""
    run, batches = tmp_path / "run", tmp_path / "batches"
    batches.mkdir()
    args = " ".join(_example(run, msd_root, "training.resume=auto"))
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\necho START restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_NNODES\n"
        # one task per node the job got: SLURM_NTASKS keeps the submitted count after an update of a requeued job
        f'srun -N "$SLURM_NNODES" -n "$SLURM_NNODES" {sys.executable} {args}\nrc=$?\necho SRUN_RC $rc\nexit $rc\n'
    )
    out = tmp_path / "out.txt"
    env = clean_env(
        SLURM_CONF=slurm_cluster.env["SLURM_CONF"], BATCH_LOG=str(batches), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), BATCH_GATE="1,1",  # the ranks wait for the signal before step (1, 1)
    )  # fmt: skip
    cmd = ["sbatch", "--parsable", "-N2", "-n2", "--requeue", "--open-mode=append", "-o", str(out), "-D", str(ROOT)]
    done = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    try:

        def at_step_3() -> bool:
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
            return max((json.loads(x)["step"] for x in lines[:-1] if x), default=0) >= 3

        _wait("step 3 of the first run", at_step_3, 300, out)
        done = slurm_cluster.run("scancel", "--signal=USR1", job)  # every task: both ranks stop at one step
        assert done.returncode == 0, done.stderr
        _wait("the requeue", lambda: _job(slurm_cluster, job).get("Restarts") == "1", 180, out)
        _scontrol(slurm_cluster, "hold", job)  # before its BeginTime (cred_expire, 10 s) comes
        _scontrol(slurm_cluster, "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=1")
        _scontrol(slurm_cluster, "release", job)
        ended = ("COMPLETED", "FAILED", "CANCELLED", "gone")  # gone: purged after MinJobAge
        _wait("the job's end", lambda: _job(slurm_cluster, job).get("JobState", "gone") in ended, 420, out)
    finally:
        slurm_cluster.run("scancel", job)
    text = out.read_text()  # --open-mode=append: both runs
    assert "START restart=0 nodes=2" in text and "START restart=1 nodes=1" in text, text[-6000:]
    # the stop: both ranks at one step, code 75; rank 0 requeued the job (which ends the first run's script)
    exits = re.findall(
        rf"\[rank (\d)/2\] WARNING ratlib.preempt: preemption: exiting at step (\d+) with code {PREEMPT_EXIT_CODE}",
        text,
    )
    assert sorted(r for r, _ in exits) == ["0", "1"] and len({s for _, s in exits}) == 1, text[-6000:]
    assert "requeued Slurm job" in text and "SRUN_RC 0" in text, text[-6000:]
    assert "2 ranks x batch 8 x accumulation 1 = global batch 16" in text, text[-6000:]
    assert "1 ranks x batch 8 x accumulation 2 = global batch 16" in text, text[-6000:]
    first, second = global_batches(batches, 0), global_batches(batches, 1)
    whole = reference_batches(SAMPLES, GLOBAL_BATCH, SEED, EPOCHS)
    stop = max(first)  # the last step the 2-rank run drew: the stop's checkpoint is after it
    assert stop[0] == 1 and stop[1] in (0, 1), list(first)  # mid-epoch 1: at (1, 1) at the latest (the gate)
    assert all(whole[k] == v for k, v in first.items())
    assert second == {k: v for k, v in whole.items() if k > stop}  # exactly the steps left, index by index
    assert len(list(batches.glob("batches*.1.jsonl"))) == 1  # one rank after the requeue
    assert _steps(run) == list(range(1, 10))  # each step once, continued
    final = _checkpoint(run / "checkpoints" / "epoch0002.pt")
    assert final["step"] == 9 and final["sampler"]["world_size"] == 1

"""ratlib.preempt under the local two-node Slurm cluster (Slurm 22.05): scancel to every task, the --signal timer,
the B: trap, a signal to one task, sbatch --requeue resuming to the same weights, no requeue loop, the lead-time
warning, srun + torchrun.

Every job runs tests/launchers/preempt_train.py on 2 ranks (one per node). The ranks wait at a known step
(``--hold-at``) until their signal came, so the tests signal on an event, not after a sleep.
"""

from __future__ import annotations

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

from ratlib.preempt import PREEMPT_EXIT_CODE
from ratlib.testing import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(420)]

TRAIN = Path(__file__).with_name("preempt_train.py")
BATCHES_PER_EPOCH = 8  # preempt_train.py: 48 samples, batch 3, 2 ranks
EPOCHS = 2
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _env(cluster) -> dict[str, str]:
    return clean_env(SLURM_CONF=cluster.env["SLURM_CONF"])


def _submit(
    cluster, run: Path, train_args: list[str], sbatch_args: list[str], *, launch: str | None = None, header="", **env
):
    """sbatch a job of 2 tasks on 2 nodes whose batch script runs ``srun`` (or ``launch``) and echoes its exit code."""
    run.mkdir(parents=True, exist_ok=True)
    train = f"{TRAIN} --run-dir {run} --epochs {EPOCHS} {' '.join(train_args)}"
    line = launch.format(python=_python(), train=train) if launch else None
    script = run / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        + header
        + (line or f"srun -N2 -n2 {_python()} {train}")
        + "\nrc=$?\necho SRUN_RC $rc\nexit $rc\n"
    )
    out = run / "out.txt"
    cmd = ["sbatch", "--parsable", "-N2", "-n2", "-o", str(out), "-D", str(run), *sbatch_args, str(script)]
    # its own port: ratlib derives one from the job id, and another test session's cluster numbers its jobs from 1 too
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run(cmd, env={**_env(cluster), **rendezvous, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], out


def _python() -> str:
    return sys.executable


def _wait(what: str, ready, timeout: float, out: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            text = out.read_text() if out is not None and out.exists() else ""
            pytest.fail(f"{what}: not within {timeout:g} s\n{text[-4000:]}")
        time.sleep(0.1)


def _wait_holding(run: Path, step: int, out: Path, timeout: float = 180) -> None:
    files = [run / "holding" / f"rank{r}.step{step}" for r in (0, 1)]
    _wait(f"both ranks at step {step}", lambda: all(f.exists() for f in files), timeout, out)


def _job(cluster, job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict ({} once the record is purged, MinJobAge=5 s after the end)."""
    done = cluster.run("scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _wait_end(cluster, job: str, out: Path, timeout: float = 180) -> dict[str, str]:
    """Wait until the job ended; its last record (with ``JobState`` and ``ExitCode``) or {} if it was purged."""
    last: dict[str, str] = {}

    def ended() -> bool:
        nonlocal last
        now = _job(cluster, job)
        if not now:
            return True
        last = now
        return now.get("JobState") in ENDED

    _wait(f"job {job} to end", ended, timeout, out)
    return last


def _stops(text: str) -> dict[int, int]:
    return {int(r): int(s) for r, s in re.findall(r"^STOP rank=(\d+) step=(\d+)", text, re.M)}


def _stop_times(text: str) -> list[float]:
    return [float(t) for t in re.findall(r"^STOP rank=\d+ step=\d+ at=([\d.]+)", text, re.M)]


def _scancel(cluster, *args: str) -> None:
    done = cluster.run("scancel", *args)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------------------------
# Signals to every task, to one task, to the batch shell; srun + torchrun. One pool of jobs, two at a time
# (each takes 1 CPU on each node), driven in order: each is signalled once both its ranks wait at step 3.

# docs/preemption.md's B: set-up: the batch shell traps the signal and forwards it to the tasks
TRAP = """trap 'scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
srun -N2 -n2 {python} {train} &
pid=$!
wait $pid; rc=$?
while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done
(exit $rc)"""

TORCHRUN = (
    "srun -N2 -n2 --ntasks-per-node=1 {python} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 "
    "--rdzv-backend c10d --rdzv-endpoint n1:{port} --shutdown-timeout 60 {extra} {train}"
)
FORWARD_USR1 = "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _torchrun(extra: str = "") -> str:
    return TORCHRUN.replace("{port}", str(free_port())).replace("{extra}", extra)


def _kill_rank1(cluster, run: Path, job: str) -> None:
    os.kill(int((run / "pids" / "rank1.pid").read_text()), signal.SIGUSR1)
    (run / "release").touch()  # rank 0 got nothing: it goes on when told, and learns of the signal at step 4


def _scancel_with(*args: str):
    return lambda cluster, run, job: _scancel(cluster, *args, job)


POOL = {  # name: (launch, extra environment, how to signal)
    "every_task": (None, {}, _scancel_with("--signal=USR1")),
    "one_task": (None, {}, _kill_rank1),
    "b_trap": (TRAP, {}, _scancel_with("--batch", "--signal=USR1")),
    "torchrun_TERM": ("torchrun", {}, _scancel_with("--signal=TERM")),
    "torchrun_USR1_forwarded": ("torchrun " + FORWARD_USR1, {}, _scancel_with("--signal=USR1")),
    "torchrun_USR1": ("torchrun", {}, _scancel_with("--signal=USR1")),
}


@pytest.fixture(scope="module")
def signalled(slurm_cluster, tmp_path_factory) -> dict[str, tuple]:
    """Every POOL job submitted at once (Slurm runs two at a time), each signalled at its step 3 in order; then
    ``{name: (run dir, output file, last job record, time the signal was sent)}`` once all ended."""
    base = tmp_path_factory.mktemp("signalled")
    jobs = {}
    for name, (launch, env, _) in POOL.items():
        if launch is not None and launch.startswith("torchrun"):
            launch, env = _torchrun(launch[len("torchrun") :].strip()), {**env, "GLOO_SOCKET_IFNAME": "lo"}
        run = base / name
        jobs[name] = (run, *_submit(slurm_cluster, run, ["--hold-at", "3"], ["--no-requeue"], launch=launch, **env))
    sent, ends = {}, {}
    try:
        for name, (run, job, out) in jobs.items():
            _wait_holding(run, 3, out, timeout=300)  # queued jobs start when an earlier one ends
            sent[name] = time.time()
            POOL[name][2](slurm_cluster, run, job)
        for name, (_run, job, out) in jobs.items():
            ends[name] = _wait_end(slurm_cluster, job, out)
    finally:
        for _, job, _ in jobs.values():
            slurm_cluster.run("scancel", job)
    return {name: (run, out, ends[name], sent[name]) for name, (run, _, out) in jobs.items()}


def test_scancel_usr1_to_every_task_stops_every_rank_at_one_step(signalled) -> None:
    """``scancel --signal=USR1 JOB`` (no ``--full``/``--batch``): every task of the srun step gets it, the batch
    shell does not; both ranks stop at one step, write the checkpoint and exit 75, and so do srun and the job."""
    run, out, record, sent = signalled["every_task"]
    text = out.read_text()
    # overlap: the agreement posted at step 3 (with the flags) is read at step 4
    assert _stops(text) == {0: 4, 1: 4}, text
    assert "rank 0 got SIGUSR1, rank 1 got SIGUSR1" in text, text
    assert f"SRUN_RC {PREEMPT_EXIT_CODE}" in text, text
    if record:  # the record may be purged already (MinJobAge)
        assert record["ExitCode"] == f"{PREEMPT_EXIT_CODE}:0", record
    # --no-requeue: scontrol requeue is refused, the refusal is logged, the exit code stays 75
    assert "requeue failed: scontrol requeue" in text, text
    state = torch.load(run / "ckpt" / "step4.pt", weights_only=False)
    assert state["step"] == 4 and state["sampler"]["position"] == 4, state["sampler"]
    assert "FINISHED" not in text
    print(f"scancel -> every rank stopped: {max(_stop_times(text)) - sent:.2f} s")


def test_a_signal_to_one_task_stops_every_rank_at_one_step(signalled) -> None:
    """``kill -USR1`` to the non-main rank's pid only (a node's slurmd, an OOM neighbour): both ranks stop."""
    run, out, _, _ = signalled["one_task"]
    text = out.read_text()
    assert _stops(text) == {0: 4, 1: 4}, text
    assert "(rank 1 got SIGUSR1;" in text and "rank 0 got" not in text, text
    assert "this rank got no signal" in text, text  # rank 0's exit line
    assert f"SRUN_RC {PREEMPT_EXIT_CODE}" in text, text
    assert (run / "ckpt" / "step4.pt").is_file()


def test_b_signal_to_the_batch_shell_forwarded_by_a_trap(signalled) -> None:
    """``--signal=B:USR1@N`` signals the batch shell only (``scancel --batch --signal=USR1`` here); the trap of
    docs/preemption.md forwards it to the tasks, which stop at one step; the script exits with srun's 75."""
    _, out, _, _ = signalled["b_trap"]
    text = out.read_text()
    assert _stops(text) == {0: 4, 1: 4}, text
    assert "rank 0 got SIGUSR1, rank 1 got SIGUSR1" in text, text
    assert f"SRUN_RC {PREEMPT_EXIT_CODE}" in text, text  # the shell survived the signal and waited for srun


@pytest.mark.parametrize(("name", "sig"), [("torchrun_TERM", "TERM"), ("torchrun_USR1_forwarded", "USR1")])
def test_srun_torchrun_documented_setups_stop_every_worker(signalled, name: str, sig: str) -> None:
    """``scancel --signal=SIG`` reaches every process of the step, the torchrun agents and their workers; in the
    set-ups of docs/preemption.md (SIGTERM, which torchrun forwards; SIGUSR1 with ``--signals-to-handle``) the
    agents survive it: the workers stop at one step, checkpoint and exit 75."""
    run, out, _, _ = signalled[name]
    text = out.read_text()
    assert _stops(text) == {0: 4, 1: 4}, text
    assert f"rank 0 got SIG{sig}, rank 1 got SIG{sig}" in text, text
    assert (run / "ckpt" / "step4.pt").is_file()
    for rank in (0, 1):
        assert f"[rank {rank}/2] WARNING ratlib.preempt: preemption: exiting at step 4 with code 75" in text, text
    # the agent got the signal too: it forwards it, waits for the workers, then ends with its SignalException (1)
    assert f"Received {getattr(signal, 'SIG' + sig).value} death signal, shutting down workers" in text, text
    assert "SRUN_RC 1" in text, text


def test_srun_torchrun_usr1_without_forwarding_kills_the_agent(signalled) -> None:
    """Why the docs say TERM (or --signals-to-handle) under srun + torchrun. Slurm signals every process of the
    step (the workers too, through proctrack), but SIGUSR1 kills the agent at once (srun: 138), the step ends
    and Slurm kills the workers that are left: whether they finished their checkpoint first is a race."""
    run, out, _, _ = signalled["torchrun_USR1"]
    text = out.read_text()
    assert "task 0: User defined signal 1" in text and "task 1: User defined signal 1" in text, text
    assert "SRUN_RC 138" in text, text  # 128 + SIGUSR1: the agents, not the workers' 75
    assert "exitcode  :" not in text, text  # no agent lived to report its workers
    for pid in (int((run / "pids" / f"rank{r}.pid").read_text()) for r in (0, 1)):  # no orphan left running
        _wait(f"worker {pid} to end", lambda p=pid: not _alive(p), 30, out)


# ----------------------------------------------------------------------------------------------
# Slurm's own --signal timer


def test_the_documented_sbatch_signal_line_stops_every_rank(slurm_cluster, tmp_path: Path) -> None:
    """``#SBATCH --signal=USR1@100`` with a 3-minute limit: Slurm itself sends SIGUSR1 to the tasks. Its check
    runs every 30 s and sends the signal up to a minute early: here about 55 s after the start (with a 2-minute
    limit it came 4 s after the start, before Python had imported torch). Both ranks stop at one step, exit 75."""
    run = tmp_path / "run"
    header = "#SBATCH --time=3\n#SBATCH --signal=USR1@100\n"
    job, out = _submit(slurm_cluster, run, ["--hold-at", "3"], ["--no-requeue"], header=header)
    record = _wait_end(slurm_cluster, job, out, timeout=240)
    text = out.read_text()
    stops = _stops(text)
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, text
    assert "rank 0 got SIGUSR1, rank 1 got SIGUSR1" in text, text
    assert f"SRUN_RC {PREEMPT_EXIT_CODE}" in text and "DUE TO TIME LIMIT" not in text, text
    if record:
        assert record["ExitCode"] == f"{PREEMPT_EXIT_CODE}:0", record


# ----------------------------------------------------------------------------------------------
# sbatch --requeue: resume to the same weights; no requeue loop


@pytest.fixture(scope="module")
def requeued_jobs(slurm_cluster, tmp_path_factory) -> dict[str, tuple]:
    """Two --requeue jobs at once (each 1 CPU on each node) and an uninterrupted reference under torchrun:
    "resume" is signalled at step 3 and finishes after its requeue; "loop" is signalled at step 3 and again
    at the first step after its requeue, before any progress."""
    base = tmp_path_factory.mktemp("requeue")
    ref_dir = base / "reference"
    ref_dir.mkdir()
    reference = subprocess.Popen(
        [_python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN)]
        + ["--run-dir", str(ref_dir), "--epochs", str(EPOCHS), "--resume", "never"],
        env=clean_env(GLOO_SOCKET_IFNAME="lo"),
        cwd=ROOT,
        stdout=open(ref_dir / "out.txt", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    opts = ["--requeue", "--open-mode=append"]
    jobs = {
        "resume": _submit(slurm_cluster, base / "resume", ["--hold-at", "3"], opts),
        "loop": _submit(slurm_cluster, base / "loop", ["--hold-at", "3", "--hold-on-restart"], opts),
    }
    try:
        for name, (job, out) in jobs.items():
            _wait_holding(base / name, 3, out)
            _scancel(slurm_cluster, "--signal=USR1", job)
        pending = {}
        for name, (job, out) in jobs.items():  # requeued: PENDING with a BeginTime cred_expire (10 s) away
            _wait(f"{name} requeued", lambda j=job: _job(slurm_cluster, j).get("Restarts") == "1", 60, out)
            pending[name] = _job(slurm_cluster, job)
        job, out = jobs["loop"]
        _wait_holding(base / "loop", 4, out, timeout=240)
        _scancel(slurm_cluster, "--signal=USR1", job)
        ends = {name: _wait_end(slurm_cluster, job, out, timeout=240) for name, (job, out) in jobs.items()}
        assert reference.wait(timeout=240) == 0, (ref_dir / "out.txt").read_text()[-4000:]
    finally:
        if reference.poll() is None:
            reference.kill()
        for job, _ in jobs.values():
            slurm_cluster.run("scancel", job)
    return {"base": base, "jobs": jobs, "pending": pending, "ends": ends, "reference": ref_dir / "final.pt"}


def test_a_requeued_job_resumes_to_the_same_weights(requeued_jobs) -> None:
    job, out = requeued_jobs["jobs"]["resume"]
    text = out.read_text()  # --open-mode=append: both runs
    pending = requeued_jobs["pending"]["resume"]
    assert "requeued Slurm job" in text, text
    assert pending["Restarts"] == "1", pending
    # the second start sees SLURM_RESTART_COUNT=1 and resumes from the stop's checkpoint, mid-epoch
    assert "START rank=0 step=0 restart=0" in text and "START rank=0 step=4 restart=1" in text, text
    assert "FINISHED rank=0 step=16" in text and "FINISHED rank=1 step=16" in text, text
    mine = torch.load(requeued_jobs["base"] / "resume" / "final.pt")
    reference = torch.load(requeued_jobs["reference"])
    assert mine.keys() == reference.keys()
    for name in mine:
        assert torch.equal(mine[name], reference[name]), f"{name} differs from the uninterrupted run"


def test_no_requeue_without_progress_since_the_last_start(requeued_jobs) -> None:
    job, out = requeued_jobs["jobs"]["loop"]
    text = out.read_text()
    end = requeued_jobs["ends"]["loop"]
    assert text.count("START rank=0 ") == 2, text  # the first run and one restart, no third
    assert "START rank=0 step=4 restart=1" in text, text
    assert "STOP rank=0 step=4" in text and "STOP rank=1 step=4" in text, text
    assert "no requeue of Slurm job" in text and "restart count 1" in text, text
    assert f"SRUN_RC {PREEMPT_EXIT_CODE}" in text, text
    if end:
        assert end["Restarts"] == "1" and end["ExitCode"] == f"{PREEMPT_EXIT_CODE}:0", end


# ----------------------------------------------------------------------------------------------
# The lead time


def test_check_lead_time_warns_when_the_signal_comes_too_late(slurm_cluster, tmp_path: Path) -> None:
    """``SBATCH_SIGNAL`` (the input variable of ``--signal``) is visible in the job; a 1 s lead against a
    step plus a 1.2 s checkpoint write warns, a 600 s lead does not."""
    args = ["--lead-check-at", "2", "--save-sleep", "1.2"]
    short = _submit(slurm_cluster, tmp_path / "short", args, ["--no-requeue"], SBATCH_SIGNAL="USR1@1")
    long = _submit(slurm_cluster, tmp_path / "long", args, ["--no-requeue"], SBATCH_SIGNAL="USR1@600")
    for job, out in (short, long):
        _wait_end(slurm_cluster, job, out, timeout=240)
    short_text, long_text = short[1].read_text(), long[1].read_text()
    assert "SRUN_RC 0" in short_text and "SRUN_RC 0" in long_text, short_text + long_text
    assert re.search(r"the signal comes 1 s before the kill \(SBATCH_SIGNAL=USR1@1\)", short_text), short_text
    assert "--signal=USR1@" in short_text, short_text
    assert "the signal comes" not in long_text, long_text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return not stat.read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False

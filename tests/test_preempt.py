"""ratlib.preempt: every rank stops at one step whichever rank got the signal; exit, requeue, bad input.

Multi-rank behaviour runs on real gloo ranks (tests/preempt_targets.py) and under a real torchrun;
handler chaining, input checks and the requeue decision also run in this process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import preempt_targets
import pytest

from ratlib import hang, preempt
from ratlib.preempt import PREEMPT_EXIT_CODE, PreemptError, PreemptInputError, SignalConflictError
from ratlib.testing import run_on_ranks

TARGETS = Path(preempt_targets.__file__)


@pytest.fixture(autouse=True)
def _clean_install():
    yield
    preempt.uninstall()
    hang.uninstall()


def stop_steps(run) -> list[int]:
    steps = []
    for rank, out in enumerate(run.stdouts):
        found = re.findall(r"STOP rank=(\d+) step=(\d+)", out)
        assert len(found) == 1 and int(found[0][0]) == rank, f"rank {rank} did not stop once:\n{run}"
        steps.append(int(found[0][1]))
    return steps


# ----------------------------------------------------------------------------------------------
# Real ranks


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "every", "overlap", "plan", "expected", "who"),
    [
        # overlap (the default): the agreement posted at step s is read at the next agreement step
        (2, 1, True, "1:5:SIGTERM", 6, {1: "SIGTERM"}),  # a non-main rank only
        (3, 3, True, "2:4:SIGTERM", 9, {2: "SIGTERM"}),  # every 3 steps: posted at 6, read at 9
        (2, 1, True, "0:7:SIGUSR1", 8, {0: "SIGUSR1"}),  # the main rank only, Slurm's usual signal
        (3, 1, True, "1:4:SIGTERM,2:4:SIGUSR1", 5, {1: "SIGTERM", 2: "SIGUSR1"}),  # two ranks, two signals
        # blocking: the agreement at step s already sees the signal
        (2, 1, False, "1:5:SIGTERM", 5, {1: "SIGTERM"}),
        (3, 3, False, "2:4:SIGTERM", 6, {2: "SIGTERM"}),
    ],
)
def test_every_rank_stops_at_one_step(tmp_path: Path, world, every, overlap, plan, expected, who) -> None:
    log = tmp_path / "requeue.log"
    run = run_on_ranks(preempt_targets.stop_together, world, args=(every, plan, str(log), 0, 40, overlap), timeout=120)
    assert not run.timed_out, run
    assert run.returncodes == [PREEMPT_EXIT_CODE] * world, run
    assert stop_steps(run) == [expected] * world, run
    for rank in range(world):
        assert "FINISHED" not in run.stdouts[rank]
        # exit() logs, on every rank, which rank got which signal at which step
        text = run.stderrs[rank]
        assert f"exiting at step {expected} with code {PREEMPT_EXIT_CODE}" in text, text
        for r, name in who.items():
            assert f"rank {r} got {name}" in text, text
        assert f"this rank got {who.get(rank, 'no signal')}" in text, text
        assert re.search(rf"signal={who.get(rank)}\b", run.stdouts[rank]), run.stdouts[rank]
    assert not log.exists(), "requeued without Slurm"


@pytest.mark.distributed
def test_agreement_on_a_side_group_as_under_nccl(tmp_path: Path) -> None:
    """Under nccl the agreement runs on a gloo side group (with install's timeout); forced here on gloo."""
    log = tmp_path / "requeue.log"
    run = run_on_ranks(preempt_targets.stop_together, 2, args=(1, "1:5:SIGTERM", str(log), 0, 40, True, True))
    assert run.returncodes == [PREEMPT_EXIT_CODE] * 2, run
    assert stop_steps(run) == [6, 6], run
    assert all("SIDE GROUP True" in out for out in run.stdouts), run


@pytest.mark.distributed
def test_no_signal_no_stop(tmp_path: Path) -> None:
    """40 steps without a signal: nobody stops, and the group tears down with an agreement still in flight."""
    run = run_on_ranks(preempt_targets.stop_together, 2, args=(1, "", str(tmp_path / "requeue.log")), timeout=120)
    assert run.returncodes == [0, 0], run
    assert all("FINISHED" in out and "STOP" not in out for out in run.stdouts), run


@pytest.mark.distributed
@pytest.mark.parametrize("signal_rank", [1, -1], ids=["rank-1-signalled", "no-signal"])
def test_agree_after_the_loop_sees_a_late_signal_on_every_rank(signal_rank: int) -> None:
    """A signal after the last should_stop (the loop's agreement still in flight) is seen by agree() on every
    rank at once."""
    run = run_on_ranks(preempt_targets.agree_after_the_loop, 2, args=(signal_rank,), timeout=120)
    if signal_rank < 0:
        assert run.returncodes == [0, 0], run
        for rank, out in enumerate(run.stdouts):
            assert f"AGREE rank={rank} run=0 False" in out and f"AGREE rank={rank} run=1 False" in out, run
        return
    assert run.returncodes == [PREEMPT_EXIT_CODE] * 2, run
    for rank, out in enumerate(run.stdouts):
        assert f"AGREE rank={rank} run=0 True progressed=True" in out, run  # 5 steps done: a requeue is allowed
        assert "STOP" not in out and "run=1" not in out, run
    assert all("rank 1 got SIGTERM" in out for out in run.outputs), run


def test_progress_is_counted_not_compared_so_a_resumed_run_counts() -> None:
    pre = preempt.install(("SIGUSR1",))
    for step in (7, 8, 9, 0):  # a run resumed at step 7 whose step count then starts again
        assert not pre.should_stop(step)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert pre.should_stop(1) and pre.stop_step == 1 < pre.start_step == 7 and pre.progressed


@pytest.mark.distributed
def test_requeue_from_rank_0_only_under_slurm(tmp_path: Path) -> None:
    log = tmp_path / "requeue.log"
    run = run_on_ranks(
        preempt_targets.stop_together,
        2,
        args=(1, "1:3:SIGTERM", str(log)),
        launcher="slurm",
        env={"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"},
        timeout=120,
    )
    assert run.returncodes == [PREEMPT_EXIT_CODE] * 2, run
    assert stop_steps(run) == [4, 4]
    assert log.read_text() == "777\n", "one requeue, of this job, by one rank"
    assert "requeued Slurm job 777" in run.stderrs[0], run.stderrs[0]
    assert "requeued" not in run.stderrs[1]


@pytest.mark.distributed
def test_no_requeue_without_progress(tmp_path: Path) -> None:
    """A signal during set-up after a restart at step 20: the first agreement (it blocks, also with overlap)
    stops at the first step, nothing was done."""
    log = tmp_path / "requeue.log"
    run = run_on_ranks(
        preempt_targets.stop_together,
        2,
        args=(1, "1:-1:SIGTERM", str(log), 20),
        launcher="slurm",
        env={"SLURM_JOB_ID": "778", "SLURM_RESTART_COUNT": "2"},
        timeout=120,
    )
    assert run.returncodes == [PREEMPT_EXIT_CODE] * 2, run
    assert stop_steps(run) == [20, 20]
    assert not log.exists()
    assert "no requeue of Slurm job 778: no step done since this start" in run.stderrs[0], run.stderrs[0]


@pytest.mark.distributed
def test_sigterm_from_outside_to_a_non_main_rank(tmp_path: Path) -> None:
    """The test itself sends SIGTERM to rank 1's pid while the ranks are stepping."""
    result: dict[str, object] = {}

    def start() -> None:
        result["run"] = run_on_ranks(preempt_targets.wait_for_external_signal, 2, args=(str(tmp_path), 2), timeout=120)

    thread = threading.Thread(target=start)
    thread.start()
    pid_file = tmp_path / "rank1.pid"
    deadline = time.monotonic() + 90
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # some steps in
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    thread.join()
    run = result["run"]
    assert run.returncodes == [PREEMPT_EXIT_CODE] * 2, run
    steps = stop_steps(run)
    assert steps[0] == steps[1] and steps[0] % 2 == 0, run
    assert "signal=SIGTERM" in run.stdouts[1] and "signal=None" in run.stdouts[0]


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["dead", "stuck"])
def test_a_rank_gone_before_the_agreement_is_an_error_not_a_hang(how: str) -> None:
    """Rank 1 exits (gloo sees the closed socket at once) or sleeps (the group's 3 s timeout bounds it)."""
    run = run_on_ranks(preempt_targets.rank_gone, 2, args=(how, 3.0), timeout=90)
    assert 0 not in run.hung_ranks, f"rank 0 waited forever:\n{run}"
    assert run.returncodes[0] == 4, run
    out = run.stdouts[0]
    # overlap: rank 0 reads step 2's agreement at step 3 (rank 1 may exit before it completed) or step 3's at 4
    assert "AGREEMENT FAILED" in out, out
    assert re.search(r"the stop agreement at step [34] failed on rank 0 of 2", out), out
    assert "another rank exited, was killed or is stuck" in out and "init_distributed(timeout=...)" in out, out


# ----------------------------------------------------------------------------------------------
# torchrun


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _wait_pids(folder: Path, n: int, timeout: float = 90) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [folder / f"rank{r}.pid" for r in range(n)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.05)
    raise AssertionError(f"workers did not start in {timeout} s")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_sigterm_to_one_worker_stops_both(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*_torchrun(), str(TARGETS), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
    )
    try:
        pids = _wait_pids(tmp_path, 2)
        time.sleep(0.3)
        os.kill(pids[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode()
    steps = [int(s) for s in re.findall(r"STOP rank=\d step=(\d+)", text)]
    assert len(steps) == 2 and steps[0] == steps[1], text
    assert "rank 1 got SIGTERM" in text, text
    # torchrun reports each worker's exit code and fails the run (no restarts asked for): 75 for both, none
    # killed by the SIGTERM torchrun sends the others once the first worker has left
    assert proc.returncode == 1, text
    assert re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", text, re.M) == [str(PREEMPT_EXIT_CODE)] * 2, text


@pytest.mark.distributed
@pytest.mark.slow
def test_sigusr1_to_the_torchrun_agent_kills_it_and_leaves_the_workers(tmp_path: Path) -> None:
    """Why docs/preemption.md says: under torchrun, send USR1 to the workers (no ``B:``) or use SIGTERM."""
    with open(tmp_path / "out.txt", "wb") as out:  # a file, not a pipe: the orphaned workers keep it open
        proc = subprocess.Popen(
            [*_torchrun(), str(TARGETS), str(tmp_path)], stdout=out, stderr=out, env=_env(), start_new_session=True
        )
    pids = _wait_pids(tmp_path, 2)
    try:
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGUSR1, proc.returncode  # a shell shows 138 = 128 + 10
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, 0)  # still running: raises ProcessLookupError otherwise
    finally:
        for pid in pids:  # SIGTERM: the orphans stop through ratlib.preempt and exit
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_forwards_sigusr1_when_told(tmp_path: Path) -> None:
    """``--signals-to-handle ...,SIGUSR1``: the agent forwards SIGUSR1 to every worker, which stop at one step."""
    extra = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "60"]
    with open(tmp_path / "out.txt", "wb") as out:
        proc = subprocess.Popen(
            [*_torchrun(), *extra, str(TARGETS), str(tmp_path)],
            stdout=out,
            stderr=out,
            env=_env(),
            start_new_session=True,
        )
    try:
        _wait_pids(tmp_path, 2)
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "out.txt").read_text()
    steps = [int(s) for s in re.findall(r"STOP rank=\d step=(\d+)", text)]
    assert len(steps) == 2 and steps[0] == steps[1], text
    assert "rank 0 got SIGUSR1" in text and "rank 1 got SIGUSR1" in text, text
    assert proc.returncode != 0, "the agent ends with its SignalException"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of an orphan is reaped by init; treat "Z" as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


# ----------------------------------------------------------------------------------------------
# In this process: handlers, chaining, input, conflicts, exit and requeue


def test_local_flag_without_a_group() -> None:
    pre = preempt.install(("SIGUSR1",))
    assert preempt.install(("SIGUSR1",)) is pre, "idempotent"
    assert not pre.should_stop(0) and pre.signal is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert pre.signal == "SIGUSR1" and pre.should_stop(1) and pre.stop_step == 1
    assert pre.should_stop(2), "once agreed, it stays stopped"
    assert [(g.rank, g.signal) for g in pre.received] == [(0, "SIGUSR1")]


def test_exit_if_stopping_returns_until_a_stop_then_closes_and_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's one stop site: nothing while no rank got a signal; then ``close()`` and exit 75, also when
    the epoch already ended at an agreed stop (``stopped``, no new agreement)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # no requeue
    closed: list[int] = []
    pre = preempt.install(("SIGUSR1",))
    assert pre.exit_if_stopping(1, close=lambda: closed.append(1)) is None and closed == []
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit) as info:
        pre.exit_if_stopping(2, close=lambda: closed.append(2))
    assert info.value.code == PREEMPT_EXIT_CODE and closed == [2] and pre.stop_step == 2
    preempt.uninstall()
    pre = preempt.install(("SIGUSR1",))
    with pytest.raises(SystemExit):  # stopped: agreed inside the epoch already, no signal needed here
        pre.exit_if_stopping(3, stopped=True, close=lambda: closed.append(3))
    assert closed == [2, 3]


def test_every_skips_the_check_between_multiples() -> None:
    pre = preempt.install(("SIGUSR1",), every=4)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert [pre.should_stop(s) for s in range(1, 6)] == [False, False, False, True, True]
    assert pre.stop_step == 4


def test_chains_to_an_earlier_python_handler_and_restores_it() -> None:
    seen: list[int] = []

    def earlier(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGUSR1, earlier)
    try:
        pre = preempt.install(("SIGUSR1", "SIGTERM"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and pre.signal == "SIGUSR1"
        preempt.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is earlier
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_default_action_is_not_chained() -> None:
    """SIGTERM's previous handler is SIG_DFL; calling it would end the process (this test would die)."""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    pre = preempt.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert pre.signal == "SIGTERM"


@pytest.mark.parametrize(
    ("kwargs", "cls", "text"),
    [
        ({"signals": ("SIGNOPE",)}, PreemptInputError, "'SIGNOPE' is not a signal on this platform"),
        ({"signals": ()}, PreemptInputError, "no signals given"),
        ({"signals": (3.5,)}, PreemptInputError, "a signal must be a name or a number"),
        ({"every": 0}, PreemptInputError, "every must be a whole number of steps >= 1. Got: every=0"),
        ({"every": 1.5}, PreemptInputError, "every=1.5"),
        ({"every": True}, PreemptInputError, "every=True"),
        ({"timeout": -1}, PreemptInputError, "timeout must be > 0"),
    ],
)
def test_bad_input(kwargs, cls, text) -> None:
    with pytest.raises(cls) as info:
        preempt.install(**kwargs)
    assert text in str(info.value)
    assert isinstance(info.value, ValueError) and not preempt.is_installed()


def test_names_and_numbers() -> None:
    pre = preempt.install(("usr1", int(signal.SIGTERM), "TERM"))
    assert pre.signums == (signal.SIGUSR1, signal.SIGTERM)
    assert preempt.installed_signals() == {signal.SIGUSR1, signal.SIGTERM}


def test_install_off_the_main_thread_is_an_error() -> None:
    caught: list[BaseException] = []

    def body() -> None:
        try:
            preempt.install()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            caught.append(exc)

    thread = threading.Thread(target=body, name="loader")
    thread.start()
    thread.join()
    assert len(caught) == 1 and isinstance(caught[0], PreemptError), caught
    assert "must run in the main thread" in str(caught[0]) and "'loader'" in str(caught[0])


def test_hang_and_preempt_on_one_signal_conflict_either_way() -> None:
    hang.install(dump_signal="SIGUSR1")
    with pytest.raises(SignalConflictError, match=r"SIGUSR1 is already ratlib.hang's stack-dump signal"):
        preempt.install()
    hang.uninstall()
    preempt.install()
    with pytest.raises(SignalConflictError, match=r"dump_signal=SIGUSR1 is already a ratlib.preempt stop signal"):
        hang.install(dump_signal="SIGUSR1")
    hang.install()  # the defaults do not conflict: SIGUSR2 dumps, SIGTERM/SIGUSR1 stop
    assert hang.installed_dump_signal() == signal.SIGUSR2


def _stopped(start: int, stop: int) -> preempt.Preemption:
    pre = preempt.install(("SIGUSR1",))
    pre.should_stop(start)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert pre.should_stop(stop)
    return pre


@pytest.mark.parametrize(
    ("env", "start", "stop", "requeued"),
    [
        ({"SLURM_JOB_ID": "12"}, 0, 5, True),
        ({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "3"}, 7, 7, False),  # no progress since this start
        ({}, 0, 5, False),  # not under Slurm
    ],
)
def test_exit_code_and_requeue_decision(tmp_path: Path, env, start, stop, requeued) -> None:
    log = tmp_path / "requeue.log"
    pre = _stopped(start, stop)
    with pytest.raises(SystemExit) as info:
        pre.exit(requeue_command=preempt_targets._requeue_recorder(str(log)), environ=env)
    assert info.value.code == PREEMPT_EXIT_CODE
    assert log.exists() == requeued
    if requeued:
        assert log.read_text() == "12\n"


def test_a_failing_requeue_still_exits(tmp_path: Path, caplog) -> None:
    pre = _stopped(0, 2)
    with pytest.raises(SystemExit) as info:
        pre.exit(7, requeue_command=(shutil.which("false") or "false",), environ={"SLURM_JOB_ID": "9"})
    assert info.value.code == 7
    assert any("requeue failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "env", "lead", "warns"),
    [
        ({"lead_seconds": 120}, {}, 120.0, False),
        ({"lead_seconds": 10}, {}, 10.0, True),
        ({}, {"SBATCH_SIGNAL": "B:USR1@30"}, 30.0, True),
        ({}, {"SLURM_SIGNAL": "USR1"}, 60.0, False),  # Slurm's default lead when @N is left out
        ({}, {"RATLIB_SIGNAL_LEAD": "300"}, 300.0, False),
        ({}, {}, None, False),  # unknown: an #SBATCH line is not visible inside the job
    ],
)
def test_check_lead_time(kwargs, env, lead, warns) -> None:
    said: list[str] = []
    got = preempt.check_lead_time(20.0, 15.0, environ=env, warn=said.append, **kwargs)
    assert got == lead
    assert bool(said) == warns, said
    if warns:
        assert "35.0 s" in said[0] and "--signal=USR1@" in said[0]


def test_import_does_not_import_torch() -> None:
    code = "import sys, ratlib.preempt; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_requeue_slurm_job_runs_the_command_once_and_never_with_ratlib_requeue_0(tmp_path: Path) -> None:
    log = tmp_path / "requeue.log"
    command = ("sh", "-c", f'echo "$0" >> {log}')
    assert preempt.requeue_slurm_job(command=command, environ={}) is False  # not under Slurm
    assert preempt.requeue_slurm_job(command=command, environ={"SLURM_JOB_ID": "9", "RATLIB_REQUEUE": "0"}) is False
    assert not log.exists(), "a run whose driver owns the job must not requeue it"
    assert preempt.requeue_slurm_job(command=command, environ={"SLURM_JOB_ID": "9"}) is True
    assert log.read_text() == "9\n"


def test_current_is_the_installed_preemption() -> None:
    assert preempt.current() is None
    pre = preempt.install(("SIGUSR1",))
    assert preempt.current() is pre
    preempt.uninstall()
    assert preempt.current() is None


@pytest.mark.distributed
def test_a_signal_that_no_agreement_takes_up_dumps_the_stacks_and_exits_before_the_kill() -> None:
    began = time.monotonic()
    run = run_on_ranks(preempt_targets.stuck_after_signal, 2, args=(3.0,), timeout=120)
    assert run.returncodes[1] == 124 and time.monotonic() - began < 50, run  # not rank 0's minute
    err = run.stderrs[1]
    assert "stack dump after SIGTERM: no stop agreed within 3 s" in err and "all_reduce" in err, err
    assert "no stop agreement took it up" in err and "RATLIB_STOP_TIMEOUT" in err, err
    assert "NOT REACHED" not in run.stdouts[1]


def test_the_stop_deadline_defaults_to_sigterm_only_and_follows_the_environment(monkeypatch) -> None:
    bound = preempt.signals._stop_bound
    monkeypatch.delenv("RATLIB_STOP_TIMEOUT", raising=False)
    assert bound(None, signal.SIGTERM) == preempt.DEFAULT_STOP_TIMEOUT and bound(None, signal.SIGUSR1) is None
    assert bound(0, signal.SIGTERM) is None and bound(7, signal.SIGUSR1) == 7
    monkeypatch.setenv("RATLIB_STOP_TIMEOUT", "90")
    assert bound(None, signal.SIGUSR1) == 90 and bound(None, signal.SIGTERM) == 90
    monkeypatch.setenv("RATLIB_STOP_TIMEOUT", "0")
    assert bound(None, signal.SIGTERM) is None
    with pytest.raises(preempt.PreemptInputError, match="stop_timeout must be >= 0"):
        preempt.install(stop_timeout=-1)

"""Functions run on several ranks by tests/test_preempt.py, and a script for torchrun (``__main__``).

Each rank prints ``STOP rank=R step=S`` when ``should_stop`` first answers True, so the tests can
check that every rank stopped at the same step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ratlib import dist_init, preempt
from ratlib.rank_logger import setup_logging


def _plan(text: str) -> dict[tuple[int, int], str]:
    """``"1:4:SIGTERM,0:4:SIGUSR1"`` -> {(rank, step): signal}: the rank signals itself before that step."""
    out: dict[tuple[int, int], str] = {}
    for item in filter(None, text.split(",")):
        rank, step, name = item.split(":")
        out[(int(rank), int(step))] = name
    return out


def _requeue_recorder(path: str) -> tuple[str, ...]:
    """A stand-in for ``scontrol requeue``: appends its arguments (the job id) to ``path``."""
    code = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + chr(10))"
    return (sys.executable, "-c", code, path)


def stop_together(
    every: int,
    plan: str,
    requeue_log: str,
    start: int = 0,
    steps: int = 40,
    overlap: bool = True,
    side_group: bool = False,
) -> int:
    """Train ``steps`` toy steps from ``start``; ranks in ``plan`` signal themselves (os.kill) at a step.

    ``side_group``: agree on a separate gloo group, as under nccl (the path is otherwise GPU-only).
    """
    if side_group:
        preempt.Preemption._agreement_group = preempt.Preemption._side_group  # type: ignore[method-assign]
    setup_logging("INFO")
    info = dist_init.init_distributed("gloo", timeout=30, connect_timeout=30)
    pre = preempt.install(every=every, overlap=overlap)
    signals = _plan(plan)
    w = torch.zeros(4)
    if (info.rank, -1) in signals:  # a signal during set-up, before the first step
        os.kill(os.getpid(), getattr(signal, signals[(info.rank, -1)]))
    for step in range(start, start + steps):
        if (info.rank, step) in signals:
            os.kill(os.getpid(), getattr(signal, signals[(info.rank, step)]))
        if pre.should_stop(step):
            print(f"STOP rank={info.rank} step={step} signal={pre.signal} received={pre.received}", flush=True)
            print(f"SIDE GROUP {pre._group is not None}", flush=True)
            pre.exit(requeue_command=_requeue_recorder(requeue_log))
        t = torch.ones(4) * (info.rank + 1)
        torch.distributed.all_reduce(t)  # the training step's own collective
        w += t
    print(f"FINISHED rank={info.rank}", flush=True)
    dist_init.shutdown()
    return 0


def wait_for_external_signal(pid_dir: str, every: int) -> int:
    """Write this rank's pid, then step slowly until the test's ``kill`` makes every rank stop."""
    setup_logging("INFO")
    info = dist_init.init_distributed("gloo", timeout=30, connect_timeout=30)
    pre = preempt.install(every=every)
    Path(pid_dir, f"rank{info.rank}.pid").write_text(str(os.getpid()))
    for step in range(10_000):
        if pre.should_stop(step):
            print(f"STOP rank={info.rank} step={step} signal={pre.signal}", flush=True)
            pre.exit(requeue=False)
        t = torch.ones(1)
        torch.distributed.all_reduce(t)
        time.sleep(0.02)
    return 1


def rank_gone(how: str, group_timeout: float) -> int:
    """Rank 1 leaves before the agreement at step 3: it exits (``how="dead"``) or sleeps (``"stuck"``)."""
    setup_logging("INFO")
    info = dist_init.init_distributed("gloo", timeout=group_timeout, connect_timeout=30)
    pre = preempt.install()
    for step in range(6):
        if info.rank == 1 and step == 3:
            if how == "dead":
                os._exit(3)
            time.sleep(group_timeout * 4 + 10)
            os._exit(3)
        started = time.monotonic()
        try:
            pre.should_stop(step)
        except preempt.PreemptError as exc:
            print(f"AGREEMENT FAILED after {time.monotonic() - started:.2f} s: {exc}", flush=True)
            return 4
    return 0


def agree_after_the_loop(signal_rank: int) -> int:
    """Two phases of 5 steps each on a fresh step count; ``signal_rank`` signals itself after the first phase's
    last ``should_stop`` (its all-reduce still in flight), then every rank calls ``agree`` (as a loop would
    before a long evaluation)."""
    setup_logging("INFO")
    info = dist_init.init_distributed("gloo", timeout=30, connect_timeout=30)
    pre = preempt.install()
    for run in range(2):
        for step in range(5):
            if pre.should_stop(step):
                print(f"STOP rank={info.rank} run={run} step={step}", flush=True)
                return 5
            t = torch.ones(1)
            torch.distributed.all_reduce(t)
        if run == 0 and info.rank == signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        agreed = pre.agree(run)
        print(f"AGREE rank={info.rank} run={run} {agreed} progressed={pre.progressed}", flush=True)
        if agreed:
            pre.exit(requeue=False)
    dist_init.shutdown()
    return 0


def stuck_after_signal(stop_timeout: float) -> int:
    """Rank 1 gets SIGTERM, then blocks in an all-reduce that rank 0 (busy elsewhere, as in data loading) joins only
    20 s later: no agreement can take the stop up, so rank 1 must dump its stacks and leave by itself first."""
    setup_logging("INFO")
    info = dist_init.init_distributed("gloo", timeout=120, connect_timeout=30)
    preempt.install(stop_timeout=stop_timeout)
    if info.rank == 1:
        print(f"SIGNAL at {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        torch.distributed.all_reduce(torch.ones(1))  # waits for rank 0
        print("NOT REACHED", flush=True)
        return 0
    time.sleep(20)
    torch.distributed.all_reduce(torch.ones(1))  # fails: rank 1 is gone
    return 0


def _script() -> int:
    """Under torchrun: ``python tests/preempt_targets.py PID_DIR [--every N]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("pid_dir")
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    return wait_for_external_signal(args.pid_dir, args.every)


if __name__ == "__main__":
    sys.exit(_script())

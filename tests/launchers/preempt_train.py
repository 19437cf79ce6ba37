"""A tiny preemption-safe training run for the Slurm tests (tests/launchers/test_preempt_slurm.py).

A small MLP with dropout on synthetic data, DDP on gloo, ``ShardedBatchSampler`` batches, AdamW. At the
top of each step ``should_stop`` asks every rank; on a stop every rank saves a checkpoint (model,
optimizer, sampler position, every rank's RNG state) and ``Preemption.exit()`` ends the process (75),
requeueing the Slurm job from rank 0 where allowed. ``--resume auto`` takes the latest checkpoint of
``--run-dir`` if there is one. Deterministic on CPU: the final weights of an interrupted and resumed run
equal an uninterrupted run's bit for bit.

Lines the tests read: ``PID rank=R pid=P`` (and ``RUN_DIR/pids/rankR.pid``), ``START rank=R step=S
restart=N``, ``STOP rank=R step=S at=T latency=L``, ``FINISHED rank=R``.

``--hold-at S``: before ``should_stop(S)`` each rank waits until it got a signal itself or the file
``RUN_DIR/release`` exists (it announces itself in ``RUN_DIR/holding/rankR.stepS``), so a
test can signal at a known step without racing the loop.
``--hold-on-restart``: the same at the first step of a restarted job (``SLURM_RESTART_COUNT >= 1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ratlib import preempt

# before torch's import (seconds under load): a signal that comes earlier would kill the process
PREEMPTION = preempt.install()  # SIGTERM and SIGUSR1

import torch  # noqa: E402

from ratlib import checkpoint, dist_init  # noqa: E402
from ratlib.data import ShardedBatchSampler  # noqa: E402
from ratlib.rank_logger import setup_logging  # noqa: E402

SAMPLES, BATCH, FEATURES = 48, 3, 6


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    return x, (x.sum(1, keepdim=True) > 0).float()


def _hold(pre: preempt.Preemption, run_dir: Path, rank: int, step: int) -> None:
    (run_dir / "holding").mkdir(exist_ok=True)
    (run_dir / "holding" / f"rank{rank}.step{step}").touch()  # the test signals once every rank is here
    release = run_dir / "release"
    while not (pre.requested or release.exists()):
        time.sleep(0.01)  # a signal interrupts the sleep and its handler runs before the next check


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", choices=["auto", "never"], default="auto")
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--hold-on-restart", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--lead-check-at", type=int, default=None, help="measure a step and a save, check_lead_time")
    parser.add_argument("--save-sleep", type=float, default=0.0, help="a slow file system, for the lead-time check")
    args = parser.parse_args()

    setup_logging("INFO")
    info = dist_init.init_distributed("gloo", timeout=60, connect_timeout=60)
    pre = PREEMPTION
    run_dir: Path = args.run_dir
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{info.rank}.pid").write_text(str(os.getpid()))
    print(f"PID rank={info.rank} pid={os.getpid()}", flush=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sampler = ShardedBatchSampler(SAMPLES, BATCH, seed=1)
    x, y = _data()
    total = args.epochs * sampler.batches_per_epoch

    step = 0
    found = checkpoint.latest(run_dir / "ckpt", "step*.pt") if args.resume == "auto" else None
    if found is not None:
        state = checkpoint.load(found)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    print(f"START rank={info.rank} step={step} restart={restart} resumed_from={found}", flush=True)
    holds = {args.hold_at} | ({step} if args.hold_on_restart and restart >= 1 else set())

    def save(at: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": checkpoint.rng_state(),  # a collective: every rank
            "step": at,
        }
        checkpoint.save(state, run_dir / "ckpt" / f"step{at}.pt")

    batches = None
    step_started = time.monotonic()
    while step < total:
        epoch = step // sampler.batches_per_epoch
        if batches is None or sampler.epoch != epoch:
            sampler.set_epoch(epoch)
            batches = iter(sampler)
        if step in holds:
            _hold(pre, run_dir, info.rank, step)
        if pre.should_stop(step):
            print(f"STOP rank={info.rank} step={step} at={time.time():.3f} latency={pre.latency:.3f}", flush=True)
            save(step)
            pre.exit()
        if step == args.lead_check_at:
            step_seconds = (time.monotonic() - step_started) / max(1, step)
            began = time.monotonic()
            time.sleep(args.save_sleep)
            save(step)
            preempt.check_lead_time(step_seconds, time.monotonic() - began)
        index = torch.tensor(next(batches))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ddp(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        time.sleep(args.step_sleep)
    if info.rank == 0:
        torch.save(model.state_dict(), run_dir / "final.pt")
    print(f"FINISHED rank={info.rank} step={step}", flush=True)
    dist_init.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

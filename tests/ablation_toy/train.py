"""A toy example that follows the ablation driver's contract, small enough for tests (well under a second
of training a run on a CPU): a small MLP regressing fixed random data, trained with DDP.

The contract (docs/examples/ablation.md): one entry ``EXAMPLE = {"schema": ..., "metric": ..., "mode": ...}``,
and the file runs as a script, ``train.py --config FILE key=value ... [--resume]`` under torchrun or srun,
writing output_dir/config.yaml, metrics.jsonl (one row per epoch, memory keys included), checkpoints/,
logs/rank{R}.log and, at the end, outcome.json (``ratlib.tracking.write_outcome``: "finished" with the final
metrics, or "stopped" after a preemption stop). ``fault`` makes a run fail on one rank, at a chosen place and
in a chosen way, to test failure handling; the environment variable ABLATION_TOY_NO_FAULTS=1 turns faults off
(a "fixed" bug, for --retry-failed).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ratlib import (
    DataConfig,
    DistInfo,
    ExperimentConfig,
    ModelConfig,
    all_reduce_mean,
    broadcast_object,
    checkpoint,
    distributed,
    dump_config,
    heartbeat,
    init_distributed,
    load_config,
    memory_report,
    preempt,
    reset_peak_memory,
    setup_logging,
)
from ratlib.config_defaults import parse_args
from ratlib.io import append_jsonl
from ratlib.tracking import run_outcome


class ToyModel(ModelConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    hidden: int = Field(default=8, ge=1)
    depth: int = Field(default=1, ge=1)  # hidden layers


class ToyData(DataConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    num_samples: int = Field(default=256, ge=8)
    dim: int = Field(default=8, ge=1)
    noise: float = Field(default=0.1, ge=0)


class Fault(BaseModel):
    """Make the run fail on one rank: at "build" (before any collective of the run: the other ranks go on
    into DDP's first broadcast), "step" (between two steps of the first epoch) or "end" (after the last
    collective), by ``how``: "raise" an exception, "kill" itself with SIGKILL, "exit" through ``os._exit(1)``,
    "abort" the way a CUDA device-side assert does (the error on stderr, then SIGABRT), or "hang" (sleep, while
    the others wait in a collective). ``sleep_s``: every epoch takes at least this long (for the signal tests).
    ``signal``: with at="end", send this signal to the rank itself instead (a preemption that comes after the
    run's last collective, in its evaluation)."""

    model_config = ConfigDict(extra="forbid")
    rank: int | None = None
    at: Literal["build", "step", "end"] = "build"
    how: Literal["raise", "kill", "exit", "abort", "hang"] = "raise"
    sleep_s: float = Field(default=0.0, ge=0)
    signal: str | None = None


class ToyConfig(ExperimentConfig):
    output_dir: str = "runs/toy"
    model: ToyModel = ToyModel()
    data: ToyData = ToyData()
    fault: Fault = Fault()


def fail(fault: Fault, rank: int, where: str) -> None:
    """The fault, on its rank."""
    print(f"toy fault on rank {rank}: {fault.how} {where}", file=sys.stderr, flush=True)
    if fault.how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.how == "exit":
        os._exit(1)
    elif fault.how == "abort":
        print("RuntimeError: CUDA error: an illegal memory access was encountered", file=sys.stderr, flush=True)
        os.abort()
    elif fault.how == "hang":
        time.sleep(3600)
    error = ValueError if where != "at a step" else RuntimeError
    raise error(f"toy fault on rank {rank} {where}")


def make_data(d: ToyData) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1234)  # the same data for every run and rank
    x = torch.randn(d.num_samples, d.dim, generator=g)
    w = torch.randn(d.dim, 1, generator=g)
    y = torch.tanh(x @ w) + d.noise * torch.randn(d.num_samples, 1, generator=g)
    n_val = d.num_samples // 4
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def build_model(m: ToyModel, dim: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = dim
    for _ in range(m.depth):
        layers += [nn.Linear(width, m.hidden), nn.ReLU()]
        width = m.hidden
    return nn.Sequential(*layers, nn.Linear(width, 1))


def train(
    cfg: ToyConfig, *, run_dir: str | Path | None = None, resume: bool = False, info: DistInfo | None = None
) -> dict[str, float]:
    info = info or init_distributed()
    t, fault = cfg.training, cfg.fault
    if os.environ.get("ABLATION_TOY_NO_FAULTS") == "1":
        fault = Fault(sleep_s=fault.sleep_s)
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    if fault.rank == info.rank and fault.at == "build":
        fail(fault, info.rank, "while building the model")
    torch.manual_seed(t.seed)
    x, y, x_val, y_val = make_data(cfg.data)
    x, y = x[info.rank :: info.world_size], y[info.rank :: info.world_size]  # this rank's shard
    model = build_model(cfg.model, cfg.data.dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.optimizer.lr, weight_decay=t.optimizer.weight_decay)
    start_epoch, start_batch, step = 0, 0, 0
    path = checkpoint.latest(run_dir / "checkpoints", "epoch*.pt") if resume else None
    if path is not None:
        state = checkpoint.load(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        start_epoch, start_batch = (state["epoch"], state["batch"]) if "batch" in state else (state["epoch"] + 1, 0)
    pre = preempt.install()
    ddp = nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    steps_per_epoch = math.ceil(len(x) / t.batch_size)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, t.num_epochs):
        reset_peak_memory(info.device)
        began = time.perf_counter()
        g = torch.Generator().manual_seed(t.seed * 1000 + epoch)
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
            if pre.should_stop(step):  # every rank at the same step: the position, then exit 75
                checkpoint.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": i,
                     "step": step},
                    run_dir / "checkpoints" / f"epoch{epoch:04d}.pt",
                )  # fmt: skip
                pre.exit()
            if fault.rank == info.rank and fault.at == "step" and epoch == start_epoch and i == 2:
                fail(fault, info.rank, "at a step")
            idx = order[i * t.batch_size : (i + 1) * t.batch_size]
            loss = nn.functional.mse_loss(ddp(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            step += 1
            heartbeat(step)
            if t.max_steps is not None and step >= t.max_steps:
                break
        time.sleep(max(0.0, fault.sleep_s - (time.perf_counter() - began)))
        with torch.no_grad():
            mse = nn.functional.mse_loss(model(x_val), y_val).item()
        score = 1.0 - mse / y_val.var().item()
        metrics = {"score": all_reduce_mean(score), "val_mse": all_reduce_mean(mse)}
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": all_reduce_mean(total / steps_per_epoch),
            **metrics,
            **memory_report(info.device, warn_fraction=None).to_metrics(),
        }
        if info.is_main:
            append_jsonl(run_dir / "metrics.jsonl", record)
        checkpoint.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step},
            run_dir / "checkpoints" / f"epoch{epoch:04d}.pt",
        )
        if t.max_steps is not None and step >= t.max_steps:
            break
    if fault.rank == info.rank and fault.at == "end" and fault.signal:
        os.kill(os.getpid(), getattr(signal, fault.signal))
    elif fault.rank == info.rank and fault.at == "end":
        fail(fault, info.rank, "after training")
    return broadcast_object(metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``train.py --config FILE key=value ... [--resume]``, as the ablation driver starts it."""
    args = parse_args(argv, description="toy example")
    setup_logging()
    cfg = load_config(args.config, overrides=args.overrides, schema=ToyConfig)
    run_dir = Path(cfg.output_dir)
    setup_logging(log_dir=run_dir / "logs")
    d = cfg.distributed
    with distributed(d.backend, timeout=d.timeout_s, stall_timeout=d.stall_timeout_s) as info:
        with run_outcome(run_dir) as finished:  # outcome.json: "finished" with the metrics, or "stopped"
            finished(metrics=train(cfg, run_dir=run_dir, resume=args.resume, info=info))
    return 0


# The one entry the ablation driver reads ("score": R^2 on the validation split, higher is better).
EXAMPLE = {"schema": ToyConfig, "metric": "score", "mode": "max"}


if __name__ == "__main__":
    sys.exit(main())

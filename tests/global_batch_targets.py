"""A loop on global batches (tests/test_data.py runs it on 1 to 3 gloo ranks): float64, a deterministic model,
DDP, ``ShardedBatchSampler(global_batch_size=...)`` and ``loss_scale``. It can stop after a step with a
checkpoint and resume on another number of ranks; the main rank writes each step's global loss and the final
weights, so the test can compare a stopped-and-resumed run with an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ratlib
from ratlib.comm import all_reduce_mean
from ratlib.data import ShardedBatchSampler, ShardingError
from ratlib.dist_init import init_distributed, shutdown

SAMPLES, GLOBAL_BATCH, EPOCHS = 51, 12, 3  # 5 steps an epoch: 12, 12, 12, 12, 3 samples (3 ranks: 1 each)


def run(out: str, stop_after: int, resume: bool) -> int:
    torch.set_num_threads(1)
    info = init_distributed("gloo")
    out_dir = Path(out)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 8, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(SAMPLES, 1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=g, dtype=torch.float64) + noise
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    sampler = ShardedBatchSampler(SAMPLES, global_batch_size=GLOBAL_BATCH, seed=5, world_size=info.world_size)
    step, epoch0 = 0, 0
    if resume:
        state = ratlib.checkpoint.load(out_dir / "ckpt.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step, epoch0 = state["step"], sampler.epoch
    ddp = DDP(model) if info.is_distributed else model
    losses = {}
    for epoch in range(epoch0, EPOCHS):
        sampler.set_epoch(epoch)
        first = sampler.position // sampler.accumulation_steps  # the global step this iteration starts at
        for k, batch in enumerate(sampler, start=first):
            per_sample = (ddp(x[batch]) - y[batch]).pow(2).sum()  # a summed loss: loss_scale makes it the mean
            (per_sample * sampler.loss_scale(1, k)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses[step] = all_reduce_mean(float(per_sample) * info.world_size / sampler.global_size(k))
            if step == stop_after:
                ratlib.checkpoint.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "sampler": sampler.state_dict()},  # the job's position: global steps done in this epoch
                    out_dir / "ckpt.pt",
                )  # fmt: skip
                shutdown()
                return 0
    if info.is_main:
        name = "resumed" if resume else "whole"
        (out_dir / f"{name}.json").write_text(json.dumps({"losses": losses, "world_size": info.world_size}))
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
    shutdown()
    return 0


def too_many_ranks(out: str) -> int:
    """A state saved on 2 ranks with one step of 2 samples left in the epoch (10 samples, global batches of 4),
    resumed on this many ranks: on 2 each rank trains its one sample (DDP) and the epoch ends; on 4 every rank
    gets the same ShardingError before the loop, and all of them still meet at a collective (no rank hangs)."""
    torch.set_num_threads(1)
    info = init_distributed("gloo")
    state = {"epoch": 0, "global_position": 2, "num_samples": 10, "global_batch_size": 4, "world_size": 2, "seed": 5}
    result: dict = {"rank": info.rank}
    try:
        sampler = ShardedBatchSampler(10, global_batch_size=4, seed=5, world_size=info.world_size)
        sampler.load_state_dict(state)
    except ShardingError as exc:
        result["error"] = str(exc)
    else:
        torch.manual_seed(1)
        model = DDP(nn.Linear(3, 1).double())
        x = torch.arange(30, dtype=torch.float64).view(10, 3)
        result["batches"] = []
        for k, batch in enumerate(sampler, start=sampler.position // sampler.accumulation_steps):
            (model(x[batch]).sum() * sampler.loss_scale(1, k)).backward()
            result["batches"].append(batch)
        result["epoch"] = sampler.epoch
    result["met"] = all_reduce_mean(1.0)  # every rank reaches this collective, the refused ones too
    (Path(out) / f"rank{info.rank}.json").write_text(json.dumps(result))
    shutdown()
    return 3 if "error" in result else 0

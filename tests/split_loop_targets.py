"""A training loop split into functions, the shape many detection references have (written here, not copied):
``train_one_epoch`` builds its own warmup ``LinearLR`` in epoch 0, a per-epoch ``MultiStepLR`` lives outside
it, and the loop counts its own steps. With preemption and resume added the way docs/preemption.md
("A loop split into functions") and docs/checkpoint.md ("Exact resume") say, a stopped and resumed run ends
with the same weights as an uninterrupted one. Run on ranks by tests/test_split_loop.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ratlib import checkpoint, dist_init, preempt
from ratlib.data import ShardedBatchSampler
from ratlib.rank_logger import setup_logging

EPOCHS, SAMPLES, BATCH, SEED = 3, 48, 3, 0


class Noisy(torch.utils.data.Dataset):
    """Random augmentation from the global RNG: a resume that shifts that RNG changes the batches."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epoch: int,
    step: int,
    pre: preempt.Preemption,
    warmup_state: dict[str, Any] | None,
    stop_rank1_at: int,
    skip: str = "",
) -> tuple[int, dict[str, Any] | None, bool]:
    """One pass over what is left of the epoch. Returns the step counter, the warmup's state (to checkpoint)
    and whether every rank agreed to stop."""
    warmup = None
    if epoch == 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
        if warmup_state is not None:  # the constructor just scaled the lr again: restore the state, then the lr
            warmup.load_state_dict(warmup_state)
            for group, lr in zip(optimizer.param_groups, warmup.get_last_lr()):
                group["lr"] = lr if skip != "lr" else group["lr"]
    batches = len(loader)  # stable over a resumed epoch: the batches this pass yields
    for i, (x, y) in enumerate(loader):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if warmup is not None:
            warmup.step()
        step += 1
        if step == stop_rank1_at and dist_init.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the cluster's signal, to one rank only
        # After the step, so the checkpoint holds it; not on the epoch's last batch: the caller checks there,
        # after the epoch's own work, so a stop never falls between the last batch and the epoch's end.
        if i + 1 < batches and pre.should_stop(step):
            return step, warmup.state_dict() if warmup is not None else None, True
    return step, warmup.state_dict() if warmup is not None else None, False


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()


def main(run_dir: str, stop_rank1_at: str, skip: str = "") -> int:
    """``skip``: leave one documented step out ("lr": the lr after the warmup's state, "generator": the
    loader's own generator), to show that the resume is then not exact."""
    setup_logging("INFO")
    ckpt = Path(run_dir) / "last.pt"
    with dist_init.distributed(device="cpu", connect_timeout=60):
        torch.manual_seed(SEED)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))  # dropout: the global RNG
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        per_epoch = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 2], gamma=0.5)
        sampler = ShardedBatchSampler(SAMPLES, BATCH, seed=SEED)
        # generator=: the loader draws its base seed from it, not from the global RNG, so the draw a resumed
        # epoch makes at its (later) start leaves the restored RNG alone
        generator = torch.Generator().manual_seed(SEED) if skip != "generator" else None
        loader = DataLoader(Noisy(), batch_sampler=sampler, generator=generator)
        pre = preempt.install()
        step, warmup_state = 0, None
        if ckpt.exists():
            state = checkpoint.load(ckpt)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            per_epoch.load_state_dict(state["per_epoch"])
            sampler.load_state_dict(state["sampler"])
            step, warmup_state = state["step"], state["warmup"]
            checkpoint.set_rng_state(state["rng"])  # last: nothing may draw between here and the loop

        def save(position: int | None = None) -> None:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "per_epoch": per_epoch.state_dict(),
                "sampler": sampler.state_dict(position=position),
                "step": step,
                "warmup": warmup_state,
                "rng": checkpoint.rng_state(),  # a collective: every rank
            }
            checkpoint.save(state, ckpt)

        lrs = []
        for epoch in range(sampler.epoch, EPOCHS):
            sampler.set_epoch(epoch)  # the same epoch keeps a restored position
            step, warmup_state, stop = train_one_epoch(
                ddp, optimizer, loader, epoch, step, pre, warmup_state, int(stop_rank1_at), skip
            )
            if stop:
                save(position=sampler.position)  # no workers: handed out == consumed
                pre.exit()  # every rank: exit 75
            per_epoch.step()
            lrs.append(optimizer.param_groups[0]["lr"])
            save()  # the epoch's checkpoint (position: the whole epoch, so a resume starts the next one)
            if pre.should_stop(step):  # again after it: a signal in the last batch stops here, nothing lost
                pre.exit()
        print("RESULT " + json.dumps({"digest": digest(model), "step": step, "lrs": lrs}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))

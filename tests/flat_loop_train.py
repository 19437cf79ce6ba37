"""A flat training script of the shape many people copy (a nanoGPT-style ``train.py``: module-level loop, DDP,
gradient accumulation, ``torch.randint`` batches from a fixed token array, dropout, and an evaluation on the
main rank only), adopted to ratlib as docs/checkpoint.md describes. Used by tests/test_checkpoint.py to show
that a run stopped after a checkpoint and resumed ends with the same weights, bit for bit.

    python tests/flat_loop_train.py OUT [--stop-after N] [--resume]      (under run_on_ranks or torchrun)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ratlib  # ratlib.checkpoint, not a bare `checkpoint`: nanoGPT-style scripts have a variable of that name
from ratlib.dist_init import init_distributed, shutdown

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--max-iters", type=int, default=12)
parser.add_argument("--eval-interval", type=int, default=4)
parser.add_argument("--stop-after", type=int, default=-1, help="leave right after the checkpoint of this iteration")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
block, batch, grad_accum, vocab = 8, 4, 2, 50

info = init_distributed("gloo")
torch.set_num_threads(1)
data = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=4000))
torch.manual_seed(1337 + info.rank)  # each rank draws its own batches


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block - 1, (batch,))
    x = torch.stack([data[i : i + block] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
    return x, y


model = nn.Sequential(nn.Embedding(vocab, 16), nn.Dropout(0.1), nn.Linear(16, vocab))  # dropout: per-rank RNG
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
iter_num = 0
if args.resume:
    state = ratlib.checkpoint.load(ratlib.checkpoint.latest(out, "ckpt*.pt"))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    iter_num = state["iter_num"]
    ratlib.checkpoint.set_rng_state(state["rng"])  # after the model is built: its init drew from the generator
    X, Y = ratlib.checkpoint.rank_entry(state)["batch"]  # this rank's own prefetched batch
else:
    X, Y = get_batch()
ddp = DDP(model) if info.is_distributed else model


@torch.no_grad()
def estimate_loss() -> float:
    model.eval()
    losses = [nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in [get_batch()] * 3]
    model.train()
    return sum(losses) / len(losses)


try:
    while True:
        if iter_num % args.eval_interval == 0:
            # The RNG state is taken here, before the main rank's evaluation draws from its generator: the resumed
            # run comes back to this very point (the checkpoint's iteration) and evaluates again.
            rng = ratlib.checkpoint.rng_state()
            if info.is_main:
                print(f"iter {iter_num}: val loss {estimate_loss():.4f}", flush=True)
            if iter_num > 0:
                ratlib.checkpoint.save(  # every rank calls it; the main rank writes
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "iter_num": iter_num,
                        "rng": rng,
                    },
                    out / f"ckpt{iter_num:04d}.pt",
                    per_rank={"batch": (X, Y)},
                )
            if iter_num == args.stop_after:
                break
        for micro in range(grad_accum):
            if isinstance(ddp, DDP):
                ddp.require_backward_grad_sync = micro == grad_accum - 1
            loss = nn.functional.cross_entropy(ddp(X).flatten(0, 1), Y.flatten()) / grad_accum
            X, Y = get_batch()  # prefetch the next batch while the backward runs
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num > args.max_iters:
            break
    if info.is_main and args.stop_after < 0:
        torch.save(model.state_dict(), out / "final.pt")
finally:
    shutdown()

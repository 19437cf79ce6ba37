"""examples/segmentation: the example's training loop against a plain hand-written PyTorch loop.

    python benchmarks/bench_segmentation.py                              # CPU: UNet 16-32-64, 64x64 slices
    python benchmarks/bench_segmentation.py --feature-dims 32 --num-blocks 4 --size 256 --batch-size 32 \
        --cases 12 --slices 64                                           # a GPU (DESIGN.md's setting)

Same model (``train.build_model``), optimiser (AdamW), schedule, loss (Dice + CE), gradient clipping,
data and precision (bf16 autocast and channels_last on CUDA, fp32 on the CPU) for both loops.
``--data memory`` (the default) feeds both the same pre-collated batches held in memory, so the
ratio measures the loops and not the loader; ``--data loader`` gives each its DataLoader (the
example's sharded batch sampler with per-sample augmentation seeds; a shuffling one for the plain
loop) with ``--workers`` processes. The plain loop: move to the device, forward, loss, zero_grad,
backward, clip, step, schedule. The example's loop is ``train.train_one_epoch`` (progress bar,
accumulation bookkeeping, DDP no_sync check, loss summed on the device, sample indices kept, a
heartbeat, a ``.item()`` every ``log_every`` steps) with every per-step safety feature on, as the example
runs it: the preemption agreement (``ratlib.preempt``), the non-finite check and a drift check every 100
steps (``ratlib.numerics``), the tracker (metrics.jsonl, TensorBoard when installed) every ``log_every``
steps and the hang watchdog (``ratlib.hang``, a heartbeat per step). One process: the agreement and the
check communicate nothing (benchmarks/bench_numerics.py measures them on 2 ranks). The two alternate
(A B A B ...) after a warm-up so that load from other processes hits both alike; images/s medians and the
median of the per-round ratios are printed (target >= 0.97).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "segmentation"))
import seg_utils as su  # noqa: E402
import train as T  # noqa: E402

from ratlib import hang, numerics, preempt, strategy  # noqa: E402
from ratlib.config_defaults import load_config  # noqa: E402
from ratlib.data import ShardedBatchSampler  # noqa: E402
from ratlib.synthetic import make_msd_segmentation  # noqa: E402
from ratlib.tracking import Tracker  # noqa: E402


class HeldBatches(list):
    """Batches held in memory, with the ``batch_sampler`` the example's loop reads its epoch length from."""

    def __init__(self, batches: list, batch_sampler: object) -> None:
        super().__init__(batches)
        self.batch_sampler = batch_sampler


def plain_epoch(model, optimizer, scheduler, loader, device, autocast, clip, memory_format, max_steps: int) -> int:
    """The loop people write by hand; returns the number of images it trained on."""
    model.train()
    seen = 0
    for step, (images, labels, _) in enumerate(loader):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        loss = su.dice_ce_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        seen += len(images)
        if step + 1 == max_steps:
            break
    return seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--feature-dims", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="in-plane size of the synthetic volumes")
    p.add_argument("--slices", type=int, default=16, help="slices per synthetic volume")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=21, help="rounds of (example, plain)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument(
        "--data",
        choices=("memory", "loader"),
        default="memory",
        help="memory: the same batches from memory for both loops; loader: a DataLoader each",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_seg_"))
    make_msd_segmentation(tmp / "task", args.cases, (args.size, args.size, args.slices), 3, seed=0)
    cfg = load_config(
        None,
        schema=T.SegmentationConfig,
        overrides=[
            f"model.feature_dims={args.feature_dims}",
            f"model.num_blocks={args.num_blocks}",
            f"training.batch_size={args.batch_size}",
            f"training.mixed_precision={args.precision == 'auto'}",
            "training.optimizer.lr=1e-3",
            f"data.num_workers={args.workers}",
            f"data.root={tmp / 'task'}",
            f"output_dir={tmp / 'run'}",
            "training.log_every=10",
        ],
    )
    task, train_set, _ = su.build_datasets(cfg, tmp / "run")
    model = T.build_model(cfg, train_set.in_channels, task.num_classes).to(device)
    memory_format = strategy.memory_format_for(cfg, device)
    model = model.to(memory_format=memory_format)
    optimizer = strategy.make_optimizer(cfg, [q for q in model.parameters() if q.requires_grad], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    autocast = strategy.autocast_for(cfg, device)
    stepper = strategy.Stepper(
        model, optimizer, scheduler, cfg.training.gradient_accumulation_steps, cfg.training.gradient_clip
    )
    collate = partial(su.pad_collate, multiple=model.multiple)
    loader_kw = dict(num_workers=args.workers, collate_fn=collate, pin_memory=cuda, persistent_workers=args.workers > 0)
    example_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=ShardedBatchSampler(len(train_set), args.batch_size, rank=0, world_size=1), **loader_kw
    )
    plain_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, **loader_kw
    )
    steps = min(args.steps, len(plain_loader))
    if args.data == "memory":  # the same pre-collated batches for both loops
        held = [batch for _, batch in zip(range(steps), example_loader)]
        if cuda:
            held = [(images.pin_memory(), labels.pin_memory(), index) for images, labels, index in held]
        plain_loader = held
        # what train_one_epoch reads of a loader besides its batches: the sampler's epoch length
        example_loader = HeldBatches(held, example_loader.batch_sampler)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    devnull = open(os.devnull, "w")  # the example's progress bars still run (and cost), unseen

    # every per-step safety feature the example turns on
    hang.install(stall_timeout=600)
    pre = preempt.install()
    sentinel = numerics.Sentinel(model, drift_every=100, run_dir=tmp / "run")
    tracker = Tracker(tmp / "run", backends=cfg.tracking.backends, config=cfg)
    done_steps = [0]

    def example(n: int) -> float:
        sync()
        start = time.perf_counter()
        with contextlib.redirect_stderr(devnull):
            cfg.training.max_steps = done_steps[0] + n
            step, _, seen, _ = T.train_one_epoch(
                stepper, example_loader, cfg, device, 0, done_steps[0], tracker, pre, sentinel
            )
            done_steps[0] = step
        sync()
        return len(seen) / (time.perf_counter() - start)

    def plain(n: int) -> float:
        sync()
        start = time.perf_counter()
        seen = plain_epoch(
            model, optimizer, scheduler, plain_loader, device, autocast, cfg.training.gradient_clip, memory_format, n
        )
        sync()
        return seen / (time.perf_counter() - start)

    import logging

    logging.getLogger("segmentation").setLevel(logging.WARNING)  # no per-step log lines in the timings
    example(args.warmup)
    plain(args.warmup)
    ex, pl = [], []
    for _ in range(args.rounds):
        ex.append(example(steps))
        pl.append(plain(steps))
    ratios = [a / b for a, b in zip(ex, pl)]
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    widths = su.widths(args.feature_dims, args.num_blocks)
    print(
        f"device {name}, UNet {widths}, {args.size}x{args.size} slices, batch {args.batch_size}, "
        f"{'bf16 autocast + channels_last' if cuda and args.precision == 'auto' else 'fp32'}, "
        f"{steps} steps x {args.rounds} rounds, data from {args.data}"
    )
    print(f"example loop: {statistics.median(ex):8.1f} images/s   (rounds: {', '.join(f'{v:.1f}' for v in ex)})")
    print(f"plain loop:   {statistics.median(pl):8.1f} images/s   (rounds: {', '.join(f'{v:.1f}' for v in pl)})")
    print(
        f"ratio example/plain: median {statistics.median(ratios):.3f} (per round: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}); target >= 0.97"
    )
    tracker.close()
    preempt.uninstall()
    hang.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""examples/detection: the example's training loop against a plain loop, and COCO evaluation backends.

    python benchmarks/bench_detection.py                        # CPU: fasterrcnn_tiny, 128 px
    python benchmarks/bench_detection.py --model fasterrcnn_mobilenet_v3_large_fpn --image-size 512 \
        --batch-size 16 --images 512                                 # a GPU

Same model, optimiser, data, batch and precision (bf16 autocast and channels_last on CUDA) for both
loops. ``--data memory`` (the default) feeds both the same batches held in memory, so the ratio
measures the loops and not the loader; ``--data loader`` gives each its DataLoader (the example's
sharded batch sampler, a shuffling one for the plain loop) with ``--workers`` processes. The plain
loop is torchvision's references/detection ``train_one_epoch`` without its per-step loss all-reduce
and ``.item()`` (so the plain loop is the faster baseline): move to the device, forward, sum the
losses, backward, clip, step, schedule. The example's loop is
``train.train_one_epoch`` (exactly-once sharded batches, accumulation bookkeeping, loss sums on the
device, a ``.item()`` every ``log_every`` steps; the preemption agreement, ``ratlib.numerics``' check and a
drift check every 100 steps, the tracker and the hang watchdog on, as the example runs). The two alternate
(A B A B ...) after a warm-up;
images/s medians and their ratio are printed (target >= 0.98). Then the model's predictions on the
val split are evaluated with pycocotools and, when installed, faster-coco-eval: both times and the
largest difference between their 12 figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "detection"))
import detection_utils as du  # noqa: E402
import train as T  # noqa: E402

from ratlib import hang, numerics, preempt, strategy  # noqa: E402
from ratlib.config_defaults import load_config  # noqa: E402
from ratlib.data import ShardedBatchSampler  # noqa: E402
from ratlib.synthetic import make_coco_detection  # noqa: E402
from ratlib.tracking import Tracker  # noqa: E402


def plain_epoch(model, optimizer, scheduler, loader, device, autocast, clip, max_steps: int) -> int:
    """The reference-style loop; returns the number of images it trained on."""
    model.train()
    images_seen = 0
    for step, (images, targets) in enumerate(loader):
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [
            {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets
        ]
        with autocast():
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        images_seen += len(images)
        if step + 1 == max_steps:
            break
    return images_seen


class HeldBatches(list):
    """Batches held in memory, with the ``batch_sampler`` the example's loop reads its epoch length from."""

    def __init__(self, batches: list, batch_sampler: object) -> None:
        super().__init__(batches)
        self.batch_sampler = batch_sampler


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fasterrcnn_tiny")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--images", type=int, default=96, help="synthetic training images")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5, help="rounds of (example, plain)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument(
        "--data",
        choices=("memory", "loader"),
        default="memory",
        help="memory: the same batches from memory for both loops; loader: a DataLoader each",
    )
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_det_"))
    n_val = max(16, args.images // 4)
    make_coco_detection(tmp, "train2017", num_images=args.images, image_size=args.image_size)
    make_coco_detection(tmp, "val2017", num_images=n_val, image_size=args.image_size)
    cfg = load_config(
        None,
        schema=T.DetectionConfig,
        overrides=[
            f"model.name={args.model}",
            f"model.min_size={args.image_size}",
            f"model.max_size={args.image_size}",
            f"training.batch_size={args.batch_size}",
            f"training.mixed_precision={args.precision == 'auto'}",
            "training.optimizer.lr=1e-4",
            f"data.num_workers={args.workers}",
            f"data.root={tmp}",
            f"output_dir={tmp / 'run'}",
        ],
    )
    train_set, val_set = du.build_datasets(cfg, tmp, masks=False)
    model = du.build_model(cfg.model, train_set.num_classes).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = strategy.make_optimizer(cfg, [q for q in model.parameters() if q.requires_grad], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    autocast = strategy.autocast_for(cfg, device)
    stepper = strategy.Stepper(
        model, optimizer, scheduler, cfg.training.gradient_accumulation_steps, cfg.training.gradient_clip
    )
    loader_kw = dict(
        num_workers=args.workers, collate_fn=du.collate, pin_memory=cuda, persistent_workers=args.workers > 0
    )
    example_loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=ShardedBatchSampler(
            len(train_set), args.batch_size, rank=0, world_size=1, group_ids=train_set.aspect_groups()
        ),
        **loader_kw,
    )
    plain_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, **loader_kw
    )
    steps = min(args.steps, len(plain_loader))
    if args.data == "memory":  # the same pre-collated batches for both loops
        held = [batch for _, batch in zip(range(steps), example_loader)]
        if cuda:
            held = [([i.pin_memory() for i in images], targets) for images, targets in held]
        plain_loader = held
        # what train_one_epoch reads of a loader besides its batches: the sampler's epoch length
        example_loader = HeldBatches(held, example_loader.batch_sampler)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    devnull = open(os.devnull, "w")  # the example's progress bars still run (and cost), unseen

    # the example's per-step features, as it runs them: preemption agreement, numerics, tracking, hang watchdog
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
        seen = plain_epoch(model, optimizer, scheduler, plain_loader, device, autocast, cfg.training.gradient_clip, n)
        sync()
        return seen / (time.perf_counter() - start)

    import logging

    logging.getLogger("detection").setLevel(logging.WARNING)  # no per-step log lines in the timings
    example(args.warmup)
    plain(args.warmup)
    ex, pl = [], []
    for _ in range(args.rounds):
        ex.append(example(steps))
        pl.append(plain(steps))
    ratios = [a / b for a, b in zip(ex, pl)]
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"device {name}, {args.model}, {args.image_size} px, batch {args.batch_size}, "
        f"{'bf16 autocast + channels_last' if cuda and args.precision == 'auto' else 'fp32'}, "
        f"{steps} steps x {args.rounds} rounds, data from {args.data}"
    )
    print(f"example loop: {statistics.median(ex):8.1f} images/s   (rounds: {', '.join(f'{v:.1f}' for v in ex)})")
    print(f"plain loop:   {statistics.median(pl):8.1f} images/s   (rounds: {', '.join(f'{v:.1f}' for v in pl)})")
    print(
        f"ratio example/plain: median {statistics.median(ratios):.3f} (per round: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.98)"
    )
    tracker.close()
    preempt.uninstall()
    hang.uninstall()

    info = T.DistInfo(0, 1, 0, 1, 0, "single", None, device, None, None)
    loader = strategy.eval_loader(cfg, val_set, info, du.collate)
    with contextlib.redirect_stderr(devnull):
        per_image = du.predict(model, loader, val_set, device, autocast)
    ids, rows = val_set.ids, np.concatenate([np.zeros((0, 7)), *per_image.values()])
    backends = ["pycocotools"] + (["faster_coco_eval"] if importlib.util.find_spec("faster_coco_eval") else [])
    figures = {}
    for backend in backends:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            with contextlib.redirect_stdout(None):
                figures[backend], _ = du.coco_eval(val_set.coco, rows, ids, backend=backend)
            times.append(time.perf_counter() - start)
        print(f"COCOeval {backend:16s}: {min(times) * 1000:8.1f} ms for {len(ids)} images, {len(rows)} detections")
    if len(figures) == 2:
        diff = max(abs(figures["pycocotools"][k] - figures["faster_coco_eval"][k]) for k in du.STAT_NAMES)
        print(f"largest difference between the backends' 12 figures: {diff:.2e}")
    else:
        print("faster-coco-eval is not installed: pip install faster-coco-eval to compare")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of ratlib.numerics on the segmentation example's step, against the same step without it, in the same run.

Two CPU gloo ranks train the segmentation example's UNet (``train.build_model``; Dice + CE, AdamW, gradient
clipping, DDP) on the same random batches. Blocks of ``--steps`` steps rotate between four loops, two models
built alike (DDP allows one comm hook per model, so the checked one has its own):
  - plain: no agreement, no check;
  - check: ``Sentinel.check`` every step, with its own small all-reduce (preemption not installed);
  - preempt: ``should_stop`` every step (the examples' default: the overlapped agreement);
  - preempt + check: both; the flag rides in the agreement (``Preemption.carry``), which then blocks.
Medians of the per-step times over ``--repeats`` blocks; the ratios check / plain and (preempt + check) /
preempt (target <= 1.01; median and spread of the per-round ratios), and the check alone in µs per call
(``--check-calls`` calls per repeat; its own all-reduce, in the agreement, and a bare all-reduce of the same size,
interleaved), which the load of other processes blurs less than whole steps do. The drift check is timed on its own
(``--drift-calls`` calls) and averaged over ``drift_every=100`` steps (target <= 1.02).

    python benchmarks/bench_numerics.py [--repeats 9] [--steps 10] [--batch 8] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(steps: int, repeats: int, batch: int, size: int, drift_calls: int, check_calls: int, out_path: str) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "examples" / "segmentation"))
    import seg_utils as su
    import train as T

    from ratlib import dist_init, numerics, preempt

    torch.set_num_threads(1)
    info = dist_init.init_distributed(backend="gloo", connect_timeout=60)
    from ratlib.config_defaults import load_config

    cfg = load_config(None, schema=T.SegmentationConfig, overrides=["training.mixed_precision=false"])

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(T.build_model(cfg, 1, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    plain_model, plain_opt = build()
    checked_model, checked_opt = build()
    sentinel = numerics.Sentinel(checked_model)  # the drift check is timed on its own, below
    gen = torch.Generator().manual_seed(info.rank)
    x = torch.randn(batch, 1, size, size, generator=gen)
    y = torch.randint(0, 3, (batch, size, size), generator=gen)

    def block(checked: bool, use_preempt: bool, first: int) -> float:
        model, opt = (checked_model, checked_opt) if checked else (plain_model, plain_opt)
        pre = preempt.install(("SIGTERM",)) if use_preempt else None
        if pre is None:
            preempt.uninstall()
        dist_init.barrier()
        start = time.perf_counter()
        for step in range(first, first + steps):
            if pre is not None and pre.should_stop(step):
                raise AssertionError("no signal was sent")
            loss = su.dice_ce_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if checked and not sentinel.check(step, loss):
                raise AssertionError("nothing non-finite was injected")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        took = (time.perf_counter() - start) / steps * 1e3
        preempt.uninstall()
        return took

    variants = {
        "plain": (False, False),
        "check": (True, False),
        "preempt": (False, True),
        "preempt + check": (True, True),
    }
    for checked, use_preempt in variants.values():  # warm-up
        block(checked, use_preempt, 1)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names, step = list(variants), 1000
    for i in range(repeats):  # rotate the order each round, so load from other processes hits each alike
        for name in names[i % 4 :] + names[: i % 4]:
            samples[name].append(block(*variants[name], step))
            step += steps
    # the check alone, on the gradients of one backward (the DDP hook's bucket flags are put back before each
    # call, so every call looks at them as in training), interleaved with the bare all-reduce it rides in: the
    # floor of any blocking agreement. Less exposed to other processes' load than whole steps.
    loss = su.dice_ce_loss(checked_model(x), y)
    checked_opt.zero_grad(set_to_none=True)
    loss.backward()
    attr = (
        "_bucket_codes" if hasattr(sentinel, "_bucket_codes") else "_bucket_flags"
    )  # the older name too, for a before/after run
    buckets = list(getattr(sentinel, attr))
    dist = sys.modules["torch.distributed"]
    world = dist.get_world_size()

    def check_calls_us(use_preempt: bool, first: int) -> float:
        pre = preempt.install(("SIGTERM",)) if use_preempt else None
        dist_init.barrier()
        took = 0.0
        for s in range(check_calls):
            setattr(sentinel, attr, list(buckets))
            start = time.perf_counter()
            sentinel.check(first + s, loss)
            took += time.perf_counter() - start
            if pre is not None:
                pre.should_stop(first + s + 1)  # reuses what check agreed: no collective
        preempt.uninstall()
        return took / check_calls * 1e6

    def all_reduce_us(first: int) -> float:
        buf = torch.zeros(3, world, dtype=torch.int64)
        dist_init.barrier()
        start = time.perf_counter()
        for _ in range(check_calls):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return (time.perf_counter() - start) / check_calls * 1e6

    alone = {
        "check alone, its own all-reduce": lambda first: check_calls_us(False, first),
        "check alone, in the agreement": lambda first: check_calls_us(True, first),
        "a bare all-reduce of [3, world] int64": all_reduce_us,
    }
    check_us: dict[str, list[float]] = {name: [] for name in alone}
    keys = list(alone)
    for i in range(max(5, repeats)):
        for name in keys[i % 3 :] + keys[: i % 3]:
            check_us[name].append(alone[name](step))
            step += check_calls + 1
    dist_init.barrier()
    start = time.perf_counter()
    for _ in range(drift_calls):
        sentinel._drift(0, dist)
    drift_ms = (time.perf_counter() - start) / drift_calls * 1e3
    if info.rank == 0:
        result: dict = {k: statistics.median(v) for k, v in samples.items()}
        result["ratios"] = {
            "check / plain": [c / p for c, p in zip(samples["check"], samples["plain"])],
            "preempt + check / preempt": [c / p for c, p in zip(samples["preempt + check"], samples["preempt"])],
        }
        result["drift_ms"] = drift_ms
        result["check_us"] = check_us
        result["tensors"] = len(sentinel._tensors())
        result["numerics_file"] = numerics.__file__
        result["parameters"] = sum(p.numel() for p in checked_model.parameters())
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist_init.shutdown()
    return 0


def _spread(values: list[float], fmt: str = ".3f") -> str:
    """The quartiles and range of the repeats (each measured next to the others, in rotating order)."""
    if len(values) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f" (quartiles {q1:{fmt}}-{q3:{fmt}}, range {min(values):{fmt}}-{max(values):{fmt}}, n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--drift-calls", type=int, default=10)
    parser.add_argument("--check-calls", type=int, default=100)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.repeats, args.batch, args.size, args.drift_calls, args.check_calls, args.out)

    from ratlib.testing.ranks import run_on_ranks

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        run = run_on_ranks(
            os.path.abspath(__file__),
            2,
            timeout=1800,
            args=["--worker", "--steps", args.steps, "--repeats", args.repeats, "--batch", args.batch]
            + ["--size", args.size, "--drift-calls", args.drift_calls, "--check-calls", args.check_calls]
            + ["--out", out],
        )
        run.check()
        with open(out) as f:
            r = json.load(f)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at the end: {load}; ratlib.numerics from {r['numerics_file']}")
    print(
        f"2 CPU gloo ranks, the segmentation example's UNet ({r['parameters'] / 1e6:.2f}M parameters, "
        f"{r['tensors']} tensors), batch {args.batch}, {args.size}x{args.size}, fp32; medians of {args.repeats} "
        f"blocks of {args.steps} steps"
    )
    for name in ("plain", "check", "preempt", "preempt + check"):
        print(f"  {name:<18} {r[name]:9.2f} ms/step")
    for name, ratios in r["ratios"].items():
        print(f"  ratio {name:<26} median {statistics.median(ratios):.3f}{_spread(ratios)}; target <= 1.01")
    base = r["plain"]
    for name, values in r["check_us"].items():
        us = statistics.median(values)
        print(
            f"  {name:<38} {us:9.1f} µs/call ({us / 1e3 / base:.2%} of a plain step; target <= 1%)"
            f"{_spread(values, '.0f')}"
        )
    print(
        f"  ratio drift check every 100 steps  {1 + r['drift_ms'] / (100 * base):.4f} "
        f"({r['drift_ms']:.2f} ms per check, {r['drift_ms'] / base:.2f} steps); target <= 1.02"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

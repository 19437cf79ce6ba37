"""Cost of ratlib.preempt's agreement, against the same loop without it, in the same run.

Two CPU gloo ranks train a small segmentation-like conv net (a two-level UNet-shaped encoder/decoder,
DDP, AdamW, 2 classes) on 96x96 inputs. Blocks of ``--steps`` steps alternate between the plain loop
and the loop with ``should_stop(step)`` at every step (``every=1``: one MAX all-reduce of a 2 x world
int64 tensor per step); the medians of the per-step times are compared. Also printed: the agreement
alone (µs per call), and the stop latency, from a SIGTERM sent to rank 1 mid-step to the step every
rank stopped at. Blocks of the three variants (plain, ``should_stop`` with the default overlap, and blocking) rotate.

    python benchmarks/bench_preempt.py [--repeats 7] [--steps 20] [--batch 8] [--size 96]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time


def _model():
    import torch
    from torch import nn

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class TinyUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc1, self.enc2 = block(3, 16), block(16, 32)
            self.mid = block(32, 32)
            self.dec2, self.dec1 = block(64, 16), block(32, 16)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e1 = self.enc1(x)
            e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
            m = self.mid(nn.functional.max_pool2d(e2, 2))
            d2 = self.dec2(torch.cat([nn.functional.interpolate(m, scale_factor=2), e2], 1))
            d1 = self.dec1(torch.cat([nn.functional.interpolate(d2, scale_factor=2), e1], 1))
            return self.head(d1)

    return TinyUNet()


def worker(steps: int, repeats: int, batch: int, size: int, out_path: str) -> int:
    import torch

    from ratlib import dist_init, preempt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = dist_init.init_distributed(backend="gloo", connect_timeout=60)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 2, (batch, size, size))
    pre = preempt.install(("SIGTERM",), every=1)

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    blocking = preempt.Preemption(pre.signums, 1, None, overlap=False)  # shares the installed flag
    variants = {"plain loop": None, "should_stop, overlap (default)": pre, "should_stop, blocking": blocking}

    def block(agreement: preempt.Preemption | None, first: int) -> float:
        dist_init.barrier()
        start = time.perf_counter()
        for step in range(first, first + steps):
            if agreement is not None and agreement.should_stop(step):
                raise AssertionError("no signal was sent")
            train_step()
        return (time.perf_counter() - start) / steps * 1e3

    block(None, 0)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    step = steps
    for i in range(repeats):  # rotate the order each round, so drift hits every variant alike
        for name in names[i % 3 :] + names[: i % 3]:
            samples[name].append(block(variants[name], step))
            step += steps

    dist_init.barrier()
    calls = 500
    start = time.perf_counter()
    for s in range(step, step + calls):
        blocking.should_stop(s)
    agreement_us = (time.perf_counter() - start) / calls * 1e6
    step += calls

    # stop latency: rank 1 gets SIGTERM from a thread at a random point of a step
    step_s = statistics.median(samples["plain loop"]) / 1e3
    if info.rank == 1:
        threading.Timer(3.3 * step_s, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    dist_init.barrier()
    while not pre.should_stop(step):
        train_step()
        step += 1
    if info.rank == 0:
        result = {k: statistics.median(v) for k, v in samples.items()}
        result["blocks"] = samples
        result["agreement_us"] = agreement_us
        result["stop_latency_s"] = pre.latency
        result["step_s"] = step_s
        result["received"] = [f"rank {g.rank} {g.signal}" for g in pre.received]
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist_init.shutdown()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.repeats, args.batch, args.size, args.out)

    from ratlib.testing.ranks import run_on_ranks

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        run = run_on_ranks(
            os.path.abspath(__file__),
            2,
            timeout=1800,
            args=["--worker", "--steps", args.steps, "--repeats", args.repeats, "--batch", args.batch]
            + ["--size", args.size, "--out", out],
        )
        run.check()
        with open(out) as f:
            r = json.load(f)
    base = r["plain loop"]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"2 CPU gloo ranks, TinyUNet, batch {args.batch}, {args.size}x{args.size}, "
        f"medians of {args.repeats} blocks of {args.steps} steps; load average at the end {load}"
    )
    print(f"  {'plain loop':<32} {base:9.2f} ms/step")
    for name in ("should_stop, overlap (default)", "should_stop, blocking"):
        # each block against the plain block of the same round (rounds rotate the order): the figure to read
        ratios = [v / b for b, v in zip(r["blocks"]["plain loop"], r["blocks"][name])]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        print(
            f"  {name:<32} {r[name]:9.2f} ms/step   ratio {r[name] / base:.3f}; per round: median "
            f"{statistics.median(ratios):.3f}, quartiles {q1:.3f}-{q3:.3f}, range {min(ratios):.3f}-{max(ratios):.3f} "
            "(target <= 1.02)"
        )
    print(
        f"  the agreement alone      {r['agreement_us']:9.1f} µs/call ({r['agreement_us'] / 1e3 / base:.2%} of a step)"
    )
    print(
        f"  stop latency             {r['stop_latency_s']:9.3f} s from SIGTERM on rank 1 to the agreed stop "
        f"(one step is {r['step_s']:.3f} s; {', '.join(r['received'])})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

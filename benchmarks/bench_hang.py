"""Cost of ratlib.hang, each figure against a baseline measured in the same run (medians of repeats,
the variants alternated so that machine noise hits them alike):

1. ``heartbeat(step)`` in ns per call, against an empty function with the same signature;
2. a small CPU training loop (MLP forward, backward, AdamW step) with ``heartbeat`` and the stall
   watchdog installed, against the same loop without either;
3. one ``ratlib.comm.all_reduce_mean`` over gloo on 2 ranks with ``check_collectives=True``, against
   the same call with the check off.

    python benchmarks/bench_hang.py [--repeats 7] [--calls 1000000] [--steps 200] [--collectives 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _empty(step: int) -> None:
    pass


def _ns_per_call(fn, calls: int) -> float:
    start = time.perf_counter_ns()
    for i in range(calls):
        fn(i)
    return (time.perf_counter_ns() - start) / calls


def bench_heartbeat(calls: int, repeats: int) -> dict[str, list[float]]:
    from ratlib import hang

    hang.install(stall_timeout=600, dump_signal=None)  # the watchdog thread runs meanwhile, as in training
    samples: dict[str, list[float]] = {"empty function": [], "heartbeat": []}
    for _ in range(repeats):
        samples["empty function"].append(_ns_per_call(_empty, calls))
        samples["heartbeat"].append(_ns_per_call(hang.heartbeat, calls))
    hang.uninstall()
    return samples


def bench_training_loop(steps: int, repeats: int) -> dict[str, list[float]]:
    import torch

    from ratlib import hang

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def loop(beat: bool) -> float:
        start = time.perf_counter()
        for step in range(steps):
            if beat:
                hang.heartbeat(step)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps * 1e6

    def watched() -> float:
        hang.install(stall_timeout=60, dump_signal=None)
        try:
            return loop(True)
        finally:
            hang.uninstall()

    loop(False)  # warm-up
    samples: dict[str, list[float]] = {"plain loop": [], "heartbeat + watchdog": []}
    for i in range(repeats):  # ABBA: which variant goes first alternates, so drift in the load hits both alike
        order = [("plain loop", lambda: loop(False)), ("heartbeat + watchdog", watched)]
        for name, run in order if i % 2 == 0 else order[::-1]:
            samples[name].append(run())
    return samples


def collective_worker(collectives: int, repeats: int, out_path: str) -> int:
    """One rank of the gloo run (started by bench_collective_check through run_on_ranks)."""
    import torch

    from ratlib import comm, dist_init, hang

    torch.set_num_threads(1)
    info = dist_init.init_distributed(backend="gloo", connect_timeout=60)
    value = torch.tensor(1.0)

    def timed() -> float:
        dist_init.barrier()
        start = time.perf_counter()
        for _ in range(collectives):
            comm.all_reduce_mean(value)
        return (time.perf_counter() - start) / collectives * 1e6

    timed()  # warm-up
    samples: dict[str, list[float]] = {"check off": [], "check_collectives": []}
    for _ in range(repeats):
        samples["check off"].append(timed())
        hang.install(check_collectives=True, dump_signal=None)
        samples["check_collectives"].append(timed())
        hang.uninstall()
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump(samples, f)
    dist_init.shutdown()
    return 0


def bench_collective_check(collectives: int, repeats: int) -> dict[str, list[float]]:
    import tempfile

    from ratlib.testing.ranks import run_on_ranks

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        run = run_on_ranks(
            os.path.abspath(__file__),
            2,
            timeout=600,
            args=["--worker", "--collectives", collectives, "--repeats", repeats, "--out", out],
        )
        run.check()
        with open(out) as f:
            return json.load(f)


def _spread(values: list[float]) -> str:
    """The quartiles and the range of the repeats: how far one repeat's figure is from another's."""
    if len(values) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f" (quartiles {q1:.3f}-{q3:.3f}, range {min(values):.3f}-{max(values):.3f})"


def _print(title: str, unit: str, results: dict[str, list[float]]) -> None:
    """Medians of each variant, and the median of the per-repeat ratios (each repeat against its own baseline,
    measured next to it) with their spread: the figure to read on a machine whose load changes."""
    (base_name, bases), (name, values) = results.items()
    base, value = statistics.median(bases), statistics.median(values)
    ratios = [v / b for b, v in zip(bases, values)]
    print(
        f"{title}\n  {base_name:<22} {base:10.1f} {unit}\n  {name:<22} {value:10.1f} {unit}"
        f"   difference {value - base:+.1f} {unit}\n"
        f"  ratio {statistics.median(ratios):.3f}, median of {len(ratios)} paired repeats{_spread(ratios)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--collectives", type=int, default=300)
    parser.add_argument("--parts", default="1,2,3", help="which of the three measures to run, e.g. 2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return collective_worker(args.collectives, args.repeats, args.out)
    parts = {int(p) for p in args.parts.split(",")}
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}, {args.repeats} repeats\n")
    if 1 in parts:
        _print(f"1. heartbeat(step), {args.calls} calls", "ns/call", bench_heartbeat(args.calls, args.repeats))
    if 2 in parts:
        _print(
            f"2. CPU training step (MLP 256-512-512-10, batch 64), {args.steps} steps",
            "us/step",
            bench_training_loop(args.steps, args.repeats),
        )
    if 3 in parts:
        _print(
            f"3. all_reduce_mean over gloo, 2 ranks, {args.collectives} calls",
            "us/call",
            bench_collective_check(args.collectives, args.repeats),
        )
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

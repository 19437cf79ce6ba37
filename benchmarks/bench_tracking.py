"""Cost of ``Tracker.log`` every step (metrics.jsonl + TensorBoard) on a small CPU segmentation step.

    python benchmarks/bench_tracking.py [--rounds 15] [--steps 20] [--threads 1]

A few conv layers on 64x64 images, batch 8, AdamW: rounds of plain steps and rounds of the same steps with
``tracker.log({"loss": ..., "lr": ...}, step)`` after each, alternating so that machine noise hits both
alike. A tracked round is timed until ``tracker.flush()`` returns, so the work the backend threads do is
counted. Prints the median ms per step of each, the ratio (issue #21 asks for <= 1.01), and the median time
of the ``log`` call itself (what the training thread waits for) and the ratio of process CPU time (all
threads, the backends' included), both less noisy than wall time on a busy machine; and, alone, the whole
cost of one record (``log`` plus the backends' writes on their threads) against a plain step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", default="jsonl,tensorboard")
    parser.add_argument("--records", type=int, default=200, help="records per repeat of the jsonl write measure")
    args = parser.parse_args()

    import torch
    from torch import nn

    from ratlib.tracking import Tracker, lr_metrics

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 2, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(8, 3, 64, 64)
    masks = torch.randint(0, 2, (8, 64, 64))

    def train_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), masks)
        loss.backward()
        optimizer.step()
        return loss.item()  # a plain loop reads the loss too (for its own print or log)

    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(Path(tmp) / "run", backends=args.backends.split(","))
        step = 0
        log_calls: list[float] = []
        plain_cpu: list[float] = []
        tracked_cpu: list[float] = []

        def plain_round() -> float:
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                train_step()
            plain_cpu.append((time.process_time() - cpu) / args.steps)
            return (time.perf_counter() - start) / args.steps

        def tracked_round() -> float:
            nonlocal step
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loss = train_step()
                t0 = time.perf_counter()
                tracker.log({"loss": loss, **lr_metrics(optimizer)}, step)
                log_calls.append(time.perf_counter() - t0)
                step += 1
            tracker.flush(timeout=60)  # the backends' work is part of the cost
            tracked_cpu.append((time.process_time() - cpu) / args.steps)  # every thread of the process
            return (time.perf_counter() - start) / args.steps

        plain_round(), tracked_round()  # warm-up: allocator, TensorBoard import and writer start
        tracker.flush(timeout=120)
        plain, tracked = [], []
        for _ in range(args.rounds):
            plain.append(plain_round())
            tracked.append(tracked_round())
        print(f"backends still logging at the end: {tracker.backends}; steps logged: {step}")
        tracker.close()

        # The whole cost of one record, alone: log() plus the backends' writes on their threads (CPU, all threads).
        alone = Tracker(Path(tmp) / "alone", backends=args.backends.split(","))
        alone.log({"loss": 0.0, "lr": 1e-3}, 0)
        alone.flush(timeout=120)
        cpu, wall, n = time.process_time(), time.perf_counter(), 500
        for i in range(1, n + 1):
            alone.log({"loss": float(i), "lr": 1e-3}, i)
        alone.flush(timeout=120)
        record_cpu, record_wall = (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n
        alone.close()

        # The jsonl backend's own write per record, on this thread: an fsync per line (ratlib.io.append_jsonl, what
        # the backend did before) against one write per line and an fsync at the flush (now), interleaved.
        from ratlib.io import append_jsonl
        from ratlib.tracking.backends import BackendStart, JsonlBackend

        def per_line_fsync(run: Path) -> None:
            for i in range(args.records):
                append_jsonl(run / "metrics.jsonl", {"step": i, "loss": float(i), "lr": 1e-3})

        def backend_writes(run: Path) -> None:
            backend = JsonlBackend()
            backend.start(BackendStart(run_dir=run, name="b", config=None, raw_config=None, resume_step=None))
            for i in range(args.records):
                backend.log({"loss": float(i), "lr": 1e-3}, i)
            backend.flush()
            backend.close()

        writes: dict[str, list[float]] = {"fsync every line (before)": [], "one write, fsync at flush (now)": []}
        for r in range(max(5, args.rounds)):
            order = [("fsync every line (before)", per_line_fsync), ("one write, fsync at flush (now)", backend_writes)]
            for name, write in order if r % 2 == 0 else order[::-1]:
                run = Path(tmp) / f"writes{r}{name[:3]}"
                run.mkdir()
                start = time.perf_counter()
                write(run)
                writes[name].append((time.perf_counter() - start) / args.records)

    p, t = statistics.median(plain), statistics.median(tracked)
    print(f"plain step:    {p * 1e3:8.3f} ms (median of {args.rounds} rounds x {args.steps} steps)")
    print(f"tracked step:  {t * 1e3:8.3f} ms  (Tracker.log every step, backends {args.backends})")
    print(
        f"one record alone (log + the backends' writes): {record_cpu * 1e6:.0f} us CPU, "
        f"{record_wall * 1e6:.0f} us wall "
        f"= {record_cpu / p:.3%} of a plain step"
    )
    call = statistics.median(log_calls)
    print(f"Tracker.log on the training thread: {call * 1e6:.1f} us per call ({call / p:.3%} of a plain step)")
    print(f"ratio tracked/plain: {t / p:.4f}  (target <= 1.01)")
    cpu = statistics.median(tracked_cpu) / statistics.median(plain_cpu)
    print(f"CPU time (all threads) tracked/plain: {cpu:.4f}  (less sensitive to a loaded machine than wall time)")
    ratios = [b / a for a, b in zip(plain, tracked)]
    spread = ""
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        spread = f" (quartiles {q1:.4f}-{q3:.4f}, range {min(ratios):.4f}-{max(ratios):.4f})"
    print(
        "median of the per-round ratios (each tracked round against the plain round before it): "
        f"{statistics.median(ratios):.4f}{spread}"
    )
    for name, values in writes.items():
        w = statistics.median(values)
        print(
            f"jsonl write per record, {name}: {w * 1e6:.0f} us wall ({w / p:.3%} of a plain step; "
            f"range {min(values) * 1e6:.0f}-{max(values) * 1e6:.0f} us over {len(values)} repeats of {args.records})"
        )
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

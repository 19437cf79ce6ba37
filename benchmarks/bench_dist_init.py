"""Cost of ratlib.dist_init against bare torch, measured in the same run (issues #4, #19).

    python benchmarks/bench_dist_init.py [--repeats 7] [--cap 10]

It prints how long it will take before it starts, and a line per repeat: each repeat starts 2 + 2
processes (their torch import is most of the time), then the unreachable-master runs take about
5 s + ``--cap`` s.

1. Set-up on 2 gloo ranks: ``init_distributed()`` vs ``init_process_group`` (+ ``set_device`` when
   there are 2 GPUs), timed inside each rank around the call only (interpreter and torch import
   excluded; the ranks start the clock together once both are ready), slowest rank per run, median of
   repeats (bare and ratlib alternate); the difference is printed (requirement: within 25 ms).
2. Time to a clear error for an unreachable master (a closed port on 127.0.0.1) with
   ``connect_timeout=5`` (requirement <= connect_timeout + 1 s = 6 s), beside bare torch in the same
   situation, capped at ``--cap`` seconds (printed when the cap was hit).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ratlib.testing import run_on_ranks  # noqa: E402


def _wait_for_start() -> None:
    """Every rank says it is ready (after its imports) and starts the clock once all are: little start skew."""
    folder, world = os.environ["READY_DIR"], int(os.environ["WORLD_SIZE"])
    open(os.path.join(folder, f"ready{os.environ['RANK']}"), "w").close()
    while len(os.listdir(folder)) < world:
        time.sleep(0.0005)


def _on_gpus() -> bool:
    """Pin ranks to GPUs only when each of the 2 ranks can have its own."""
    import torch

    return torch.cuda.device_count() >= 2


def ratlib_init() -> int:
    import torch
    import torch.distributed  # imported before the clock starts, as in bare_init

    from ratlib.dist_init import init_distributed, shutdown

    device = "cuda" if _on_gpus() else "cpu"
    _wait_for_start()
    start = time.perf_counter()
    init_distributed("gloo", device=device, connect_timeout=30)
    print(f"SECONDS {time.perf_counter() - start:.6f}")
    torch.distributed.barrier()  # rank 0 hosts the store: it must not leave while a rank still reads it
    shutdown()
    return 0


def bare_init() -> int:
    import torch
    import torch.distributed as dist

    on_gpus = _on_gpus()
    _wait_for_start()
    start = time.perf_counter()
    if on_gpus:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo")
    print(f"SECONDS {time.perf_counter() - start:.6f}")
    dist.barrier()  # rank 0 hosts the store: it must not leave while a rank still reads it
    dist.destroy_process_group()
    return 0


def _seconds(run) -> float:
    values = [float(line.split()[1]) for out in run.stdouts for line in out.splitlines() if line.startswith("SECONDS")]
    if len(values) != run.world_size:
        raise RuntimeError(f"a rank did not report its time:\n{run}")
    return max(values)  # the job is ready when the slowest rank is


def unreachable(code: str, cap: float) -> tuple[float, bool, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    prelude = "import time, torch\nt = time.perf_counter()\ntry:\n"
    post = (
        "\nexcept Exception as e:\n    print('ERR', type(e).__name__, str(e).splitlines()[0][:160])\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", prelude + "    " + code + post],
            capture_output=True,
            text=True,
            env=env,
            timeout=cap + 20,
        )
    except subprocess.TimeoutExpired:
        return cap, True, "(killed at the cap)"
    lines = out.stdout.splitlines()
    seconds = next((float(x.split()[1]) for x in lines if x.startswith("SECONDS")), cap)
    message = next((x[4:] for x in lines if x.startswith("ERR")), out.stderr[-200:])
    return seconds, False, message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cap", type=float, default=10.0)
    parser.add_argument("--rank-mode", choices=["ratlib", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:  # we are one rank of a run started below
        raise SystemExit(ratlib_init() if args.rank_mode == "ratlib" else bare_init())
    import torch

    where = "with set_device on 2 GPUs" if torch.cuda.device_count() >= 2 else "on CPU"
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, ranks {where}")
    print(
        f"{args.repeats} repeats of 2 runs of 2 ranks, then about {5 + args.cap:g} s of unreachable-master runs; "
        "the first repeat's time gives the estimate",
        flush=True,
    )
    ours, bare = [], []
    began = time.monotonic()
    for i in range(args.repeats):  # alternate, so machine noise hits both alike
        for mode, store in (("bare", bare), ("ratlib", ours)):
            with tempfile.TemporaryDirectory() as ready:
                run = run_on_ranks(__file__, 2, args=("--rank-mode", mode), env={"READY_DIR": ready}, timeout=120)
                store.append(_seconds(run.check()))
        per = (time.monotonic() - began) / (i + 1)
        print(
            f"  repeat {i + 1}/{args.repeats}: bare {bare[-1] * 1e3:.1f} ms, ratlib {ours[-1] * 1e3:.1f} ms "
            f"(about {per * (args.repeats - i - 1) + 5 + args.cap:.0f} s left)",
            flush=True,
        )
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    print(
        f"set-up on 2 gloo ranks, median of {args.repeats}: ratlib {m_ours * 1e3:.1f} ms "
        f"({min(ours) * 1e3:.1f}-{max(ours) * 1e3:.1f}), bare torch {m_bare * 1e3:.1f} ms "
        f"({min(bare) * 1e3:.1f}-{max(bare) * 1e3:.1f}), difference {(m_ours - m_bare) * 1e3:+.1f} ms "
        f"(requirement: within 25 ms), ratio {m_ours / m_bare:.2f}x"
    )

    ours_s, _, ours_msg = unreachable(
        "from ratlib.dist_init import init_distributed\n    init_distributed(device='cpu', connect_timeout=5)", args.cap
    )
    bare_s, hit, bare_msg = unreachable(
        f"import datetime, torch.distributed as dist\n"
        f"    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds={args.cap}))",
        args.cap,
    )
    print(f"unreachable master, ratlib connect_timeout=5: error after {ours_s:.1f} s (requirement <= 6 s): {ours_msg}")
    cap_note = (
        f" (hit the cap of {args.cap:g} s; torch's default timeout is 30 min)" if hit or bare_s >= args.cap else ""
    )
    print(f"unreachable master, bare torch (timeout={args.cap:g} s): {bare_s:.1f} s{cap_note}: {bare_msg}")


if __name__ == "__main__":
    main()

"""Cost of ratlib.dist_init against bare torch, measured in the same run (issue #4).

    python benchmarks/bench_dist_init.py [--repeats 7] [--cap 30]

1. Set-up on 2 gloo ranks: ``init_distributed()`` vs ``init_process_group`` (+ ``set_device`` when
   there are 2 GPUs), timed inside each rank around the call only (interpreter and torch import
   excluded; all ranks start the clock at the same moment), slowest rank per run, median of repeats
   (bare and ratlib alternate), ratio printed (requirement <= 1.1x).
2. Time to a clear error for an unreachable master (a closed port on 127.0.0.1) with
   ``connect_timeout=5`` (requirement <= 6 s), beside bare torch in the same situation, capped at
   ``--cap`` seconds (printed when the cap was hit).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ratlib.testing import run_on_ranks  # noqa: E402


def _wait_for_start() -> None:
    """All ranks start the clock at the same wall-clock moment, after their imports: no start skew."""
    time.sleep(max(0.0, float(os.environ["START_AT"]) - time.time()))


def _on_gpus() -> bool:
    """Pin ranks to GPUs only when each of the 2 ranks can have its own."""
    import torch

    return torch.cuda.device_count() >= 2


def ratlib_init() -> int:
    import torch  # noqa: F401  - imported before the clock starts, as in bare_init

    from ratlib.dist_init import init_distributed, shutdown

    device = "cuda" if _on_gpus() else "cpu"
    _wait_for_start()
    start = time.perf_counter()
    init_distributed("gloo", device=device, connect_timeout=30)
    print(f"SECONDS {time.perf_counter() - start:.6f}")
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
    parser.add_argument("--cap", type=float, default=30.0)
    parser.add_argument("--rank-mode", choices=["ratlib", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:  # we are one rank of a run started below
        raise SystemExit(ratlib_init() if args.rank_mode == "ratlib" else bare_init())
    import torch

    where = "with set_device on 2 GPUs" if torch.cuda.device_count() >= 2 else "on CPU"
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, ranks {where}")
    ours, bare = [], []
    for _ in range(args.repeats):  # alternate, so machine noise hits both alike
        for mode, store in (("bare", bare), ("ratlib", ours)):
            env = {"START_AT": str(time.time() + 8)}
            store.append(_seconds(run_on_ranks(__file__, 2, args=("--rank-mode", mode), env=env, timeout=120).check()))
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    print(
        f"set-up on 2 gloo ranks, median of {args.repeats}: ratlib {m_ours * 1e3:.1f} ms "
        f"({min(ours) * 1e3:.1f}-{max(ours) * 1e3:.1f}), bare torch {m_bare * 1e3:.1f} ms "
        f"({min(bare) * 1e3:.1f}-{max(bare) * 1e3:.1f}), ratio {m_ours / m_bare:.2f}x (requirement <= 1.1x)"
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

"""Cost of ratlib.rank_logger calls against stdlib logging (and accelerate / lightning_utilities when
installed), measured in the same run. Prints ns per call (median of repeats) and the ratios.

    python benchmarks/bench_logging.py [--repeats 7] [--calls 200000]

Requirements (issue #3): a dropped call on a non-main rank <= 1.5x a stdlib ``logger.debug`` below
the logger's level; an emitted call on the main rank <= 1.2x the same record through a plain stdlib
logger with the same handler.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time


def _per_call(fn, calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(samples)


def _paired(fns: dict, calls: int, repeats: int) -> dict[str, float]:
    """Median ns/call of each function, measured in alternation so that machine noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_per_call(fn, calls, 1))
    return {name: statistics.median(values) for name, values in samples.items()}


def dropped(calls: int, repeats: int) -> dict[str, float]:
    """Run as rank 1 of 2 (environment set by the parent): the info call is dropped."""
    from ratlib.rank_logger import get_logger, setup_logging

    setup_logging("INFO", stream=io.StringIO())
    ours = get_logger("bench.ratlib")
    plain = logging.getLogger("bench.plain")
    plain.setLevel(logging.INFO)
    out = _paired(
        {
            "stdlib disabled debug": lambda: plain.debug("step %d", 1),
            "ratlib dropped info (rank 1)": lambda: ours.info("step %d", 1),
        },
        calls,
        repeats,
    )
    try:
        from accelerate.logging import get_logger as acc_get_logger
        from accelerate.state import PartialState

        # accelerate would start a process group for WORLD_SIZE=2: build its state as one process, then
        # make it rank 1 (the logging call path reads only process_index, as on a real rank 1).
        saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
        try:
            state = PartialState(cpu=True)
        finally:
            os.environ.update(saved)
        state._shared_state.update(process_index=1, local_process_index=1)
        assert not state.is_main_process
        acc = acc_get_logger("bench.acc", log_level="INFO")
        out["accelerate dropped info"] = _per_call(
            lambda: acc.info("step %d", 1, main_process_only=True), calls, repeats
        )
    except Exception as exc:  # not installed, or cannot start here
        out["accelerate dropped info"] = float("nan")
        print(f"(accelerate skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    try:
        from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_only

        rank_zero_only.rank = int(os.environ["RANK"])  # what Lightning sets at start-up

        out["lightning rank_zero_info (rank 1)"] = _per_call(lambda: rank_zero_info("step %d", 1), calls, repeats)
    except Exception as exc:
        out["lightning rank_zero_info (rank 1)"] = float("nan")
        print(f"(lightning_utilities skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def emitted(calls: int, repeats: int) -> dict[str, float]:
    from ratlib.rank_logger import get_logger, setup_logging

    sink = io.StringIO()
    setup_logging("INFO", stream=sink)
    ours = get_logger("bench.ratlib")
    handler = logging.getLogger().handlers[-1]  # ratlib's console handler, formatter included
    plain = logging.getLogger("bench.plain")
    plain.propagate = False
    plain.setLevel(logging.INFO)
    plain_handler = logging.StreamHandler(sink)
    plain_handler.setFormatter(handler.formatter)
    plain_handler.addFilter(lambda r: setattr(r, "rank_tag", "[rank 0/2] ") or True)  # the same text as ours
    plain.addHandler(plain_handler)

    def reset() -> None:
        sink.seek(0)
        sink.truncate()

    def ours_call() -> None:
        ours.info("step %d", 1)

    def plain_call() -> None:
        plain.info("step %d", 1)

    def plain_reset() -> None:
        plain_call()
        if sink.tell() > 1 << 24:
            reset()

    def ours_reset() -> None:
        ours_call()
        if sink.tell() > 1 << 24:
            reset()

    return _paired({"stdlib emitted info": plain_reset, "ratlib emitted info (rank 0)": ours_reset}, calls, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--child", choices=["dropped", "emitted"])
    args = parser.parse_args()
    if args.child:
        fn = dropped if args.child == "dropped" else emitted
        print(json.dumps(fn(args.calls, args.repeats)))
        return
    results = {}
    for child, env in (
        ("dropped", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}),
        ("emitted", {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}),
    ):
        full = {**os.environ, **env}
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                child,
                "--repeats",
                str(args.repeats),
                "--calls",
                str(args.calls if child == "dropped" else args.calls // 10),
            ],
            capture_output=True,
            text=True,
            env=full,
            check=True,
        )
        sys.stderr.write(out.stderr)
        results.update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'call':40s} {'ns/call':>10s}")
    for name, ns in results.items():
        print(f"{name:40s} {ns:10.1f}")
    drop = results["ratlib dropped info (rank 1)"] / results["stdlib disabled debug"]
    emit = results["ratlib emitted info (rank 0)"] / results["stdlib emitted info"]
    print(f"\ndropped ratio (ratlib / stdlib disabled debug): {drop:.2f}x  (requirement <= 1.5x)")
    print(f"emitted ratio (ratlib / stdlib same handler):    {emit:.2f}x  (requirement <= 1.2x)")
    for other in ("accelerate dropped info", "lightning rank_zero_info (rank 1)"):
        value = results.get(other, float("nan"))
        if value == value:
            print(f"{other} / stdlib disabled debug: {value / results['stdlib disabled debug']:.2f}x")


if __name__ == "__main__":
    main()

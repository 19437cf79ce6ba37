"""Sharded checkpoints (ratlib.checkpoint with a folder path), against their baselines in the same run.

W CPU gloo ranks hold a state of ``--mb`` MB in all (``--tensors`` float32 DTensors sharded by rows over the
ranks, as FSDP2 holds a model). For each W of ``--worlds`` (one launch each), medians of ``--repeats``:

- async: the time ``save(..., async_save=True)`` blocks the loop (staging to CPU memory), against a synchronous
  ``save`` of the same state (files fsynced, committed); issue 29 asks for <= 0.2;
- sync: the sharded synchronous save on W ranks, against one ``torch.save`` (then flush and fsync, as the
  checkpoint does) of 1/W of the state by one process while the others wait; issue 29 asks for <= 1.2;
- load: ``load(folder, into=...)`` of a checkpoint saved at another world size (DCP reshards), against the one
  saved at this world size; issue 29 asks for <= 1.5. Every launch after the first loads the checkpoints of
  the launches before it, and a last launch at the first W loads the others'.

    python benchmarks/bench_checkpoint.py [--worlds 2,4] [--mb 256] [--tensors 16] [--repeats 5] [--dir DIR]
    python benchmarks/bench_checkpoint.py --quick      # a smoke run: 2 ranks, 8 MB, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _state(world: int, rank: int, mb: int, tensors: int, mesh: object, value: float) -> dict:
    import torch
    from torch.distributed.tensor import DTensor, Shard

    cols = 1024
    rows = max(world, (mb * 2**20 // 4 // tensors // cols) // world * world)
    local_rows = rows // world
    model = {}
    for i in range(tensors):
        first = rank * local_rows  # row r of the whole tensor holds value + i + r / 1000 (each shard differs)
        rows_values = torch.arange(first, first + local_rows, dtype=torch.float32).unsqueeze(1) / 1000
        local = (rows_values + (value + i)).expand(local_rows, cols).contiguous()
        model[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return {"model": model, "step": int(value)}


def worker(folder: str, mb: int, tensors: int, repeats: int, load_only: bool, out: str) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ratlib import checkpoint, dist_init

    torch.set_num_threads(1)
    info = dist_init.init_distributed(backend="gloo", connect_timeout=120)
    world, rank = info.world_size, info.rank
    mesh = init_device_mesh("cpu", (world,))
    root = Path(folder)
    result: dict[str, object] = {"world": world}
    state = _state(world, rank, mb, tensors, mesh, 1.0)
    mine = root / f"ck_w{world}"
    if not load_only:
        sync_s, async_s, base_s = [], [], []
        checkpoint.save(state, root / "warmup")  # imports, the DCP group, the page cache
        for r in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            checkpoint.save(state, root / f"sync{r}")
            sync_s.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            checkpoint.save(state, root / f"async{r}", async_save=True)
            async_s.append(time.perf_counter() - start)  # the time the loop is blocked
            checkpoint.wait_pending()
            dist.barrier()
            if rank == 0:  # deleting the previous ones is not part of what is timed
                shutil.rmtree(root / f"sync{r}")
                shutil.rmtree(root / f"async{r}")
            if rank == 0:  # one process writes 1/W of the state (its shards), the others wait
                local = {k: v.to_local() for k, v in state["model"].items()}
                start = time.perf_counter()
                with open(root / "baseline.pt", "wb") as f:
                    torch.save(local, f)
                    f.flush()
                    os.fsync(f.fileno())
                base_s.append(time.perf_counter() - start)
            dist.barrier()
        checkpoint.save(state, mine)
        result.update(sync=statistics.median(sync_s), async_blocked=statistics.median(async_s))
        if rank == 0:
            result["baseline"] = statistics.median(base_s)
    loads: dict[str, list[float]] = {}
    folders = sorted(root.glob("ck_w*"))
    target = _state(world, rank, mb, tensors, mesh, 0.0)
    for ck in folders:  # a first, untimed load of each: both in the page cache alike
        checkpoint.load(ck, into=target)
    for r in range(repeats):  # interleaved, the order rotating, so that drift hits each alike
        for ck in folders[r % len(folders) :] + folders[: r % len(folders)]:
            target = _state(world, rank, mb, tensors, mesh, 0.0)
            dist.barrier()
            start = time.perf_counter()
            checkpoint.load(ck, into=target)
            loads.setdefault(ck.name, []).append(time.perf_counter() - start)
            got = target["model"]["layer0.weight"].full_tensor()
            want = torch.arange(got.shape[0], dtype=torch.float32).unsqueeze(1) / 1000 + 1.0
            assert torch.equal(got, want.expand_as(got)), f"{ck} loaded wrong values"
    result["loads"] = {name: statistics.median(times) for name, times in loads.items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist_init.shutdown()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--mb", type=int, default=256, help="the whole state, MB (split over the ranks)")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 ranks, 8 MB, 1 repeat")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.dir, args.mb, args.tensors, args.repeats, args.load_only, args.out)
    if args.quick:
        args.worlds, args.mb, args.tensors, args.repeats = "2", 8, 4, 1

    from ratlib.testing.ranks import run_on_ranks

    worlds = [int(w) for w in args.worlds.split(",")]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plan = [(w, False) for w in worlds] + ([(worlds[0], True)] if len(worlds) > 1 else [])
        for world, load_only in plan:
            out = os.path.join(tmp, f"result{len(results)}.json")
            cmd = ["--worker", "--dir", tmp, "--mb", args.mb, "--tensors", args.tensors, "--repeats", args.repeats]
            cmd += ["--out", out] + (["--load-only"] if load_only else [])
            env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
            run_on_ranks(os.path.abspath(__file__), world, args=cmd, env=env, timeout=3600).check()
            with open(out) as f:
                results.append(json.load(f))
    print(
        f"CPU gloo ranks, a state of {args.mb} MB in {args.tensors} DTensors sharded by rows, "
        f"medians of {args.repeats}, os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"
    )
    for r in results:
        w = r["world"]
        if "sync" in r:
            print(f"W={w}")
            print(
                f"  async save, loop blocked  {r['async_blocked'] * 1e3:9.1f} ms   sync save {r['sync'] * 1e3:9.1f} ms"
                f"   ratio {r['async_blocked'] / r['sync']:.3f}   (target <= 0.2)"
            )
            print(
                f"  sharded sync save         {r['sync'] * 1e3:9.1f} ms   torch.save of 1/{w} "
                f"{r['baseline'] * 1e3:9.1f} ms   ratio {r['sync'] / r['baseline']:.3f}   (target <= 1.2)"
            )
        same = r["loads"].get(f"ck_w{w}")
        for name, t in sorted(r["loads"].items()):
            if name != f"ck_w{w}" and same:
                print(
                    f"  load at W={w}, saved at W={name[4:]}  {t * 1e3:9.1f} ms   saved at W={w} {same * 1e3:9.1f} ms"
                    f"   ratio {t / same:.3f}   (target <= 1.5)"
                )
        if same and len(r["loads"]) == 1:
            print(f"  load at W={w}, saved at W={w}  {same * 1e3:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run by the launcher tests under a real launcher: prints one JSON line per rank, or fails on purpose.

``--fail-rank N`` makes rank N raise after set-up; the others then wait in a collective until the launcher
ends the job. ``--slurm-node-as-host`` takes the host name from SLURMD_NODENAME (n1, n2 of the local
cluster). Other arguments (``--local_rank=N`` from DeepSpeed's launcher) are ignored: ratlib reads the
environment.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from ratlib.dist_init import distributed


def main(argv: list[str]) -> int:
    fail_rank = int(argv[argv.index("--fail-rank") + 1]) if "--fail-rank" in argv else -1
    if "--slurm-node-as-host" in argv:  # two Slurm "nodes" on one host: let each rank's node name be its host
        socket.gethostname = lambda: os.environ["SLURMD_NODENAME"]
    with distributed(backend="gloo", device="cpu", connect_timeout=60, timeout=120) as info:
        total = torch.tensor([float(info.rank)])
        dist.all_reduce(total)
        if info.rank == fail_rank:
            print(f"FAILAT {time.time()}", flush=True)  # the test bounds the time from here to the job's end
            raise RuntimeError(f"rank {info.rank} fails on purpose")
        if fail_rank >= 0:
            time.sleep(0.5)
            dist.barrier()  # the survivors block here until the launcher ends the job
        record = {
            "rank": info.rank,
            "world_size": info.world_size,
            "local_rank": info.local_rank,
            "local_world_size": info.local_world_size,
            "node_rank": info.node_rank,
            "launcher": info.launcher,
            "master": f"{info.master_addr}:{info.master_port}",
            "sum": total.item(),
            "host": socket.gethostname(),
            "slurm_nodeid": os.environ.get("SLURM_NODEID"),
            "argv": argv,
        }
        print("RANKINFO " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

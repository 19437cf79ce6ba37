"""Functions run on real ranks (``run_on_ranks``) by test_rendezvous.py, with launcher variables set by hand."""

from __future__ import annotations

import json
import os
import socket


def report() -> int:
    """Set up the group; print this rank's DistInfo as JSON, or the DistInitError (exit 3).

    ``FAKE_HOST`` replaces the host name, so one machine can play several nodes.
    """
    from ratlib.dist_init import DistInitError, init_distributed, shutdown

    if "FAKE_HOST" in os.environ:
        socket.gethostname = lambda: os.environ["FAKE_HOST"]
    try:
        info = init_distributed("gloo", device="cpu", connect_timeout=float(os.environ.get("CONNECT_TIMEOUT", "30")))
    except DistInitError as exc:
        print(f"DISTINITERROR {exc}", flush=True)
        return 3
    fields = ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "master_addr", "master_port")
    print("INFO " + json.dumps({k: getattr(info, k) for k in fields}), flush=True)
    shutdown()
    return 0

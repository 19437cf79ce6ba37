"""Shared test set-up. Markers and the ``run_on_ranks`` fixture come from ratlib's pytest plugin."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Keep spawned ranks from fighting over the two cores of a CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _private_torch_extensions() -> None:
    """DeepSpeed's CPU ranks JIT-build an op (deepspeed_shm_comm) under TORCH_EXTENSIONS_DIR. The suite builds
    into the environment's own folder, not the user's shared ~/.cache, and clears a lock a killed build left:
    torch's FileBaton waits forever on one (a build takes minutes at most)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    folder = Path(sys.prefix) / "torch-extensions"
    for lock in folder.glob("*/*/lock"):
        if time.time() - lock.stat().st_mtime > 15 * 60:
            lock.unlink(missing_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)


_private_torch_extensions()

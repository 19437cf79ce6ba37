"""Shared test set-up. Markers and the ``run_on_ranks`` fixture come from ratlib's pytest plugin."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.needs_torch("2.6", "FSDP2's fully_shard")``: skipped, with the reason, on an older torch
    (the oldest-torch step of .ci/run runs the suite on the oldest torch that pyproject.toml declares)."""
    from ratlib.errors import torch_version

    have = torch_version()
    for item in items:
        marker = item.get_closest_marker("needs_torch")
        if marker is None or have is None:
            continue
        minimum, why = marker.args
        if have < tuple(int(x) for x in minimum.split(".")[:2]):
            reason = f"needs torch >= {minimum} ({why}); torch {have[0]}.{have[1]} is installed"
            item.add_marker(pytest.mark.skip(reason=reason))

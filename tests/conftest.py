"""Shared test set-up. Markers and the ``run_on_ranks`` fixture come from ratlib's pytest plugin."""

from __future__ import annotations

import os

# Keep spawned ranks from fighting over the two cores of a CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

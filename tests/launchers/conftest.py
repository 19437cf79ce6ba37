"""Fixtures of the launcher tests: the local two-node Slurm cluster (session-scoped) and the Python to run.

A launcher that is not installed skips its tests with the apt command; with CI=true it fails them instead, so
CI cannot go green without the launchers (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_helpers import in_ci, need
from slurm_cluster import SlurmCluster, missing_tools, start_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A two-node Slurm cluster (n1, n2, 2 CPUs each) on this host for the session; run srun/sbatch/scancel/
    scontrol through ``cluster.run(...)`` or with ``env=cluster.env``."""
    need("Slurm", missing_tools())
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI=true: the local Slurm cluster needs root (slurmd runs as root)", pytrace=False)
        pytest.skip("the local Slurm cluster needs root (slurmd runs as root)")
    # not under pytest's 0700 temporary directory: munged runs as the munge user and must reach its files
    root = Path(tempfile.mkdtemp(prefix="ratlib-slurm-"))
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def python() -> str:
    return sys.executable

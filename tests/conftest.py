"""Shared test set-up. Markers and the ``run_on_ranks`` fixture come from ratlib's pytest plugin."""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NoReturn

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

# Modules the project installs (Makefile: dev, detection, medical, plot and deepspeed extras), and the install
# command for each. With CI=true one that does not import is a broken environment, so a failure, never a skip.
INSTALLED_BY_THE_PROJECT = {
    "torch": "pip install torch",
    "numpy": "pip install numpy",
    "hypothesis": "pip install 'ratlib[dev]'",
    "torchvision": "pip install 'ratlib[detection]'",
    "pycocotools": "pip install 'ratlib[detection]'",
    "PIL": "pip install 'ratlib[detection]'",
    "faster_coco_eval": "pip install 'ratlib[detection]'",
    "nibabel": "pip install 'ratlib[medical]'",
    "matplotlib": "pip install 'ratlib[plot]'",
    "deepspeed": "pip install 'ratlib[deepspeed]'",
    "tensorboard": "pip install 'ratlib[tensorboard]'",
    "mpi4py": "pip install 'ratlib[mpi]'",
    "wandb": "pip install 'ratlib[wandb]' (the tests: ratlib[tracking-test])",
    "mlflow": "pip install 'ratlib[mlflow]' (the tests: ratlib[tracking-test])",
}


def in_ci() -> bool:
    """True when the CI variable says so (``CI=true``, as GitHub Actions and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(module: str, detail: str) -> NoReturn:
    """Stop a test whose ``module`` cannot be used (``detail`` says why): a failure with ``CI=true`` when the
    project installs it, else a skip with the reason and the install command."""
    top = module.split(".")[0]
    how = INSTALLED_BY_THE_PROJECT.get(top, f"pip install {top}")
    reason = f"{module} {detail}; {how}"
    if in_ci() and top in INSTALLED_BY_THE_PROJECT:
        pytest.fail(f"CI=true and the project installs {top}, but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str) -> ModuleType:
    """Import ``module`` for a test, or stop it through ``unavailable`` (a failure in CI, a skip elsewhere)."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not only ImportError: a broken DeepSpeed build raises others at import
        unavailable(module, f"does not import ({type(exc).__name__}: {exc})")

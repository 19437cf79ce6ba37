"""The suite's rule for optional packages: with CI=true a package the project installs that does not import is a
failure, never a skip (``require``, ``unavailable``). A module of its own, not conftest: tests/ has two
conftest.py files, and ``from conftest import ...`` would find whichever pytest imported first."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

# Modules the project installs (Makefile: dev, detection, medical, plot and deepspeed extras), and the install
# command for each. With CI=true one that does not import is a broken environment, so a failure, never a skip.
INSTALLED_BY_THE_PROJECT = {
    "torch": "pip install torch",
    "numpy": "pip install numpy",
    "hypothesis": "pip install 'ratlib[dev]'",
    "mypy": "pip install 'ratlib[dev]'",
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

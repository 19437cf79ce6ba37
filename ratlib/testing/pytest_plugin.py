"""pytest plugin registered through the ``pytest11`` entry point: the ``run_on_ranks`` fixture
and the ``gpu`` / ``distributed`` / ``slow`` markers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ratlib.errors import MissingDependencyError, message

try:
    import pytest
except ImportError as exc:  # pragma: no cover - the plugin only loads under pytest
    raise MissingDependencyError(
        message("ratlib.testing.pytest_plugin needs pytest", fix="pip install 'ratlib[dev]'")
    ) from exc

from .ranks import RankRun
from .ranks import run_on_ranks as _run_on_ranks


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``distributed``, ``slow`` and ``gpu`` markers."""
    config.addinivalue_line("markers", "distributed: runs several real processes over gloo on 127.0.0.1")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped (with the reason) when it is absent")


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "CUDA is not available (torch.cuda.is_available() is False)"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu``, with the reason, where CUDA is absent."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    available, reason = _cuda_available()
    if available:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def run_on_ranks() -> Callable[..., RankRun]:
    """``run_on_ranks(target, world_size=2, *, args=(), env=None, timeout=60, launcher="torchrun") -> RankRun``.

    Runs a script path or an importable module-level function on real gloo ranks on 127.0.0.1.
    """

    def runner(target: Any, world_size: int = 2, **kwargs: Any) -> RankRun:
        return _run_on_ranks(target, world_size, **kwargs)

    return runner

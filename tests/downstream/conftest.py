"""Only for ratlib's own test run: ``pytest tests/`` in the ratlib checkout must not collect this sample
project's tests (they import ``downstream_proj``, which is installed only by tests/test_downstream.py).
When the project is run on its own (its folder is pytest's rootdir) this changes nothing."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if config.rootpath.resolve() != HERE and collection_path.resolve().is_relative_to(HERE / "tests"):
        return True
    return None

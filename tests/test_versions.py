"""The torch version guard: a feature that needs a newer torch than the oldest supported one (pyproject.toml's
floor, which .ci/oldest-torch tests) says so with a ``TorchVersionError``, read without importing torch."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from ratlib import errors
from ratlib.errors import RatlibError, TorchVersionError, require_torch, torch_version


def _installed(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    def fake(name: str) -> str:
        if name != "torch" or version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(errors.importlib.metadata, "version", fake)
    if version is None:
        monkeypatch.delitem(sys.modules, "torch", raising=False)


def test_torch_version_reads_major_and_minor(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, "2.3.1+cu121")
    assert torch_version() == (2, 3)
    _installed(monkeypatch, "2.15.0")
    assert torch_version() == (2, 15)  # compared as numbers: 2.15 is newer than 2.6
    _installed(monkeypatch, None)
    assert torch_version() is None


def test_an_older_torch_gets_a_ratlib_error_naming_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, "2.3.1")
    with pytest.raises(TorchVersionError) as info:
        require_torch("2.6", "FSDP2 (fully_shard)")
    assert isinstance(info.value, RatlibError) and isinstance(info.value, RuntimeError)
    text = str(info.value)
    assert "FSDP2 (fully_shard) needs torch >= 2.6" in text and "Got: torch 2.3" in text
    assert "pip install 'torch>=2.6'" in text and f"torch >= {errors.OLDEST_TORCH}" in text


def test_a_new_enough_or_absent_torch_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, "2.15.0")
    require_torch("2.6", "sharded checkpoints")
    _installed(monkeypatch, None)  # no torch: the feature's own import says so
    require_torch("2.6", "sharded checkpoints")


def test_the_guard_imports_no_torch() -> None:
    code = "import sys; from ratlib.errors import require_torch as r; r('2.3', 'x'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

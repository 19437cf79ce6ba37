"""The suite's own rule (tests/conftest.py): with CI=true a package the project installs that does not import
is a failure, never a skip; elsewhere a skip with the reason and the install command."""

from __future__ import annotations

import sys

import pytest
from suite_rules import require


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_blocked_project_package_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # `import nibabel` raises ImportError
    with pytest.raises(pytest.fail.Exception, match=r"CI=true and the project installs nibabel.*ratlib\[medical\]"):
        require("nibabel")


def test_a_blocked_project_package_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(pytest.skip.Exception, match=r"deepspeed does not import .*pip install 'ratlib\[deepspeed\]'"):
        require("deepspeed")


def test_a_package_the_project_does_not_install_only_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.skip.Exception, match="no_such_package_for_ratlib does not import"):
        require("no_such_package_for_ratlib")


def test_an_importable_package_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require("json.decoder") is sys.modules["json.decoder"]

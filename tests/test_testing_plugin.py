"""ratlib.testing as downstream projects see it: the pytest11 plugin, its fixture and markers, install hints."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

pytest_plugins = ["pytester"]


def test_plugin_is_registered_as_pytest11_entry_point() -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="pytest11")}
    assert eps.get("ratlib") == "ratlib.testing.pytest_plugin"


@pytest.mark.distributed
def test_downstream_project_uses_run_on_ranks_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        worker="""
        import os

        def check_rank(expected_world):
            assert int(os.environ["WORLD_SIZE"]) == expected_world
            print("hello from", os.environ["RANK"])
            return 0
        """,
        test_downstream="""
        import pytest
        import worker

        @pytest.mark.distributed
        def test_two_ranks(run_on_ranks):
            run = run_on_ranks(worker.check_rank, 2, args=(2,), timeout=60).check()
            assert [o.strip() for o in run.stdouts] == ["hello from 0", "hello from 1"]
        """,
    )
    # A subprocess, so that the plugin is loaded the way users get it: through the entry point.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1)


def test_gpu_marker_skips_with_reason_without_cuda(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_needs_cuda():
            import torch
            assert torch.cuda.is_available()
        """
    )
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", "--strict-markers")
    import torch

    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*gpu test: CUDA is not available*"])


def _import_with_blocked(module: str, blocked: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; sys.modules[{blocked!r}] = None\nimport {module}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_strategies_without_hypothesis_give_install_hint() -> None:
    out = _import_with_blocked("ratlib.testing.strategies", "hypothesis")
    assert out.returncode != 0
    # MissingDependencyError is a RatlibError and an ImportError (tests/test_errors_rule.py checks the classes)
    assert "MissingDependencyError" in out.stderr and "pip install 'ratlib[dev]'" in out.stderr


def test_plugin_without_pytest_gives_install_hint() -> None:
    out = _import_with_blocked("ratlib.testing.pytest_plugin", "pytest")
    assert out.returncode != 0
    assert "pip install 'ratlib[dev]'" in out.stderr


def test_rank_runner_needs_neither_pytest_nor_hypothesis() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None; sys.modules['hypothesis'] = None\n"
        "from ratlib.testing import run_on_ranks\n"
        "run = run_on_ranks('time:sleep', 2, args=(0,), timeout=30)\n"
        "print(run.returncodes)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 0]"

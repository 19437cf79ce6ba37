"""ratlib.testing as a downstream project uses it: the sample project in tests/downstream/, installed.

A copy of the project is built into a wheel (its own setuptools backend, no network, no build
isolation) and the wheel is installed into a temporary site folder on PYTHONPATH; the copy's sources
are then removed, so its tests can only import the installed package. Its suite runs in a fresh pytest
process, where the ``run_on_ranks`` fixture and the markers come from ratlib's pytest11 entry point.
Then its property test runs against the deliberately broken resolver, which hypothesis must catch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent / "downstream"

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _install_wheel(wheel: Path, site: Path) -> None:
    """What ``pip install --target site`` does for a pure-Python wheel: unpack it (package and dist-info)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert not any(n.split("/", 1)[0].endswith(".data") for n in names), f"not a pure wheel: {names}"
        zf.extractall(site)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The sample project's folder (tests and pyproject, no sources) and an environment that has it installed."""
    tmp = tmp_path_factory.mktemp("downstream")
    proj = tmp / "downstream_proj"
    shutil.copytree(
        SAMPLE,
        proj,
        ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info", ".hypothesis", ".pytest_cache"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(proj)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("downstream_proj-*.whl")
    _install_wheel(wheel, tmp / "site")
    shutil.rmtree(proj / "src")
    shutil.rmtree(proj / "build", ignore_errors=True)

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "DOWNSTREAM_RESOLVER")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp / "site"), env.get("PYTHONPATH")) if p)
    return proj, env


def _pytest(proj: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sample_project_passes_with_the_installed_plugin(project: tuple[Path, dict[str, str]]) -> None:
    proj, env = project
    run = _pytest(proj, env, "-v")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    plugins = re.search(r"^plugins: (.*)$", out, re.M)
    assert plugins and "ratlib-" in plugins.group(1), out  # loaded through the pytest11 entry point
    assert re.search(r"^rootdir: .*downstream_proj$", out, re.M), out  # the project's own pytest settings
    for test in (
        "test_mean_metric_on_two_ranks_weighs_every_value_once",
        "test_every_spelling_of_a_split_resolves_to_the_same_file",
        "test_eval_shard_follows_the_launcher",
    ):
        assert re.search(rf"::{test} PASSED", out), out
    assert re.search(r"\b6 passed\b", out), out


def test_property_test_catches_the_doubled_year_resolver(project: tuple[Path, dict[str, str]]) -> None:
    proj, env = project
    run = _pytest(
        proj,
        {**env, "DOWNSTREAM_RESOLVER": "doubled_year"},
        "tests/test_paths.py",
        "-k",
        "every_spelling",
        "--hypothesis-show-statistics",
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out  # tests failed (not an error in collection or usage)
    assert re.search(r"\b1 failed\b", out), out
    # hypothesis found it while generating, within its default budget (the test does not set max_examples)
    generate = re.search(r"during generate phase.*?- (\d+) passing, (\d+) failing, and (\d+) invalid", out, re.S)
    assert generate and int(generate.group(2)) >= 1, out
    assert sum(map(int, generate.groups())) <= 100, out
    # the falsifying example is a spelling with the year in it, and the message shows the doubled year
    spellings = re.findall(r"Draw \d+ \(spelling [ab]\): \('([^']*)'", out)
    assert spellings and any(re.search(r"(19|20)\d\d", s) for s in spellings), out
    assert re.search(r"instances_[a-z-]+\d{4}2017\.json", out), out  # e.g. instances_train20172017.json

"""The package users get: ``make build`` (``uv build``) makes a wheel and an sdist; the wheel installs into a
fresh environment (its dependencies pinned to this environment's versions, so uv takes them from its cache),
and there, away from the repository, ``import ratlib`` imports no torch, ``ratlib env`` runs and ``ratlib
doctor`` passes the example configs the sdist ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _uv() -> str:
    uv = ROOT / ".tools" / "bin" / "uv"  # make bootstraps it
    found = str(uv) if uv.exists() else shutil.which("uv")
    if not found:
        pytest.skip("uv is not installed: make venv bootstraps it into .tools/")
    return found


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT")}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    command = " ".join(argv)
    assert proc.returncode == 0, f"{command} (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel and the sdist that ``make build`` makes, built from this tree into a temp folder."""
    out = tmp_path_factory.mktemp("dist")
    _run([_uv(), "build", "--out-dir", str(out), str(ROOT)], cwd=ROOT)
    wheels, sdists = list(out.glob("ratlib-*.whl")), list(out.glob("ratlib-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


def test_the_wheel_and_sdist_hold_what_users_need(built: tuple[Path, Path]) -> None:
    wheel, sdist = built
    names = zipfile.ZipFile(wheel).namelist()
    assert "ratlib/py.typed" in names and "ratlib/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/"))], "the wheel holds only ratlib/"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ratlib = ratlib.cli:main" in text and "pytest11" in text
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    for path in ("examples/detection/config.yaml", "examples/segmentation/config.yaml", "docs/getting-started.md"):
        assert any(m.endswith(path) for m in members), path


@pytest.mark.slow
def test_the_wheel_installs_and_runs_in_a_fresh_environment(built: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, sdist = built
    uv = _uv()
    venv = tmp_path / "venv"
    _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies at this environment's versions: uv's cache has them, nothing large is downloaded.
    pins = _run([uv, "pip", "freeze", "--python", sys.executable], cwd=tmp_path).stdout
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(line for line in pins.splitlines() if "==" in line and "ratlib" not in line))
    _run([uv, "pip", "install", "--quiet", "--python", str(python), "-c", str(constraints), str(wheel)], cwd=tmp_path)

    # Away from the repository: what runs is the installed wheel, not this tree.
    probe = "import sys, ratlib; print(ratlib.__file__); print('torch' in sys.modules)"
    out = _run([str(python), "-c", probe], cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(venv)), out
    assert out[1] == "False", "import ratlib imported torch"

    env_out = _run([str(venv / "bin" / "ratlib"), "env"], cwd=tmp_path).stdout
    assert "torch" in env_out and "launcher" in env_out.lower(), env_out

    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "sdist", filter="data")
    configs = sorted((tmp_path / "sdist").glob("ratlib-*/examples/*/config.yaml"))
    assert len(configs) >= 2, configs
    doctor = _run([str(venv / "bin" / "ratlib"), "doctor", *map(str, configs)], cwd=tmp_path).stdout
    assert f"checked {len(configs)} config(s): 0 error(s)" in doctor, doctor

"""Foundation: light import, the ``ratlib`` command, the multi-rank harness."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from importlib import metadata

import pytest
import rank_targets

from ratlib.testing import run_on_ranks

HEAVY = ("torch", "torchvision", "deepspeed", "pycocotools", "nibabel", "matplotlib")


def test_import_ratlib_is_light() -> None:
    code = (
        "import sys, ratlib\n"
        "dir(ratlib)\n"
        "import ratlib.rank_logger, ratlib.coco_paths, ratlib.config_defaults, ratlib.dist_init, ratlib.comm\n"
        "import ratlib.hang, ratlib.checkpoint, ratlib.memory, ratlib.synthetic, ratlib.doctor, ratlib.cli\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import ratlib loaded heavy modules: {out.stdout.strip()}"


def test_import_ratlib_plain_is_light() -> None:
    code = f"import sys, ratlib; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_attribute_raises() -> None:
    import ratlib

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ratlib.nope  # noqa: B018


def test_env_command_json() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    out = subprocess.run(
        [sys.executable, "-m", "ratlib", "env", "--json"], capture_output=True, text=True, check=True, env=env
    )
    info = json.loads(out.stdout)
    assert info["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert info["packages"]["torch"] is not None
    assert info["launch"]["rank"] == 1 and info["launch"]["world_size"] == 4
    assert info["launch"]["master_addr"] == "10.0.0.1"


def test_env_command_text() -> None:
    out = subprocess.run([sys.executable, "-m", "ratlib", "env"], capture_output=True, text=True, check=True)
    for word in ("python", "torch", "torchvision", "pycocotools", "deepspeed", "nibabel", "CUDA available", "launcher"):
        assert word in out.stdout
    # Each package row shows the installed version, or "not installed" exactly when it is absent.
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.stdout.splitlines() if line[:1].isalnum())
    for dist in ("torch", "torchvision", "pycocotools", "deepspeed", "nibabel"):
        try:
            expected = metadata.version(dist)
        except metadata.PackageNotFoundError:
            expected = "not installed"
        assert rows[dist].strip() == expected, (dist, rows[dist])


def test_env_command_text_says_not_installed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ratlib import cli

    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda dist: None if dist == "deepspeed" else real(dist))
    cli._print_env(cli.collect_env())
    lines = capsys.readouterr().out.splitlines()
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines if line[:1].isalnum())
    assert rows["deepspeed"].strip() == "not installed" and rows["torch"].strip() == metadata.version("torch")


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "ratlib"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "env" in out.stderr and "doctor" in out.stderr and "coco" in out.stderr


@pytest.mark.distributed
def test_three_rank_all_reduce() -> None:
    run = run_on_ranks(rank_targets.all_reduce_rank_sum, 3, args=(3,), timeout=120).check()
    for rank in range(3):
        assert f"rank {rank} sum 6" in run.stdouts[rank]


@pytest.mark.distributed
def test_hanging_rank_is_killed_and_reported() -> None:
    start = time.monotonic()
    run = run_on_ranks(rank_targets.hang_on_rank, 2, args=(1,), timeout=5)
    assert time.monotonic() - start < 60  # killed at its 5 s deadline, not after the hour it sleeps
    assert run.timed_out and not run.ok
    assert run.hung_ranks == [1]
    assert run.returncodes[0] == 0 and run.returncodes[1] is None
    assert "rank 1 started" in run.stdouts[1]
    assert "hung_ranks=[1]" in str(run)


def test_exit_codes_by_rank(run_on_ranks) -> None:  # the pytest fixture
    run = run_on_ranks(rank_targets.exit_with, 3, args=({2: 3},), timeout=60)
    assert run.returncodes == [0, 0, 3]
    assert not run.ok and not run.timed_out
    with pytest.raises(AssertionError, match="returncodes=\\[0, 0, 3\\]"):
        run.check()


def test_script_target_and_env(tmp_path, run_on_ranks) -> None:
    script = tmp_path / "show.py"
    script.write_text("import os, sys; print(os.environ['RANK'], os.environ['EXTRA'], sys.argv[1])\n")
    run = run_on_ranks(str(script), 2, args=("hello",), env=lambda r: {"EXTRA": f"x{r}"}).check()
    assert [o.strip() for o in run.stdouts] == ["0 x0 hello", "1 x1 hello"]


def test_local_function_is_refused() -> None:
    def local() -> None:
        pass

    with pytest.raises(ValueError, match="module-level function"):
        run_on_ranks(local, 2)


def test_env_command_fails_when_it_prints_a_launcher_error() -> None:
    env = {"PATH": "/usr/bin:/bin", "RANK": "1"}  # half-set: no WORLD_SIZE
    out = subprocess.run([sys.executable, "-m", "ratlib", "env"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stdout
    assert "ERROR: env environment: RANK is set but WORLD_SIZE is not (a half-set launcher)" in out.stdout
    js = subprocess.run(
        [sys.executable, "-m", "ratlib", "env", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert js.returncode == 1 and "half-set" in json.loads(js.stdout)["launch"]["error"]


def test_every_ratlib_error_class_is_a_ratlib_error_and_a_builtin() -> None:
    import inspect

    from ratlib import coco_paths, comm, errors, hang, io, launch, rank_logger

    classes = [
        obj
        for module in (coco_paths, comm, hang, io, launch, rank_logger)
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == module.__name__
    ]
    assert {c.__name__ for c in classes} >= {
        "CocoPathError",
        "CocoValidationError",
        "CollectiveMismatchError",
        "DistInitError",
        "HangError",
        "LogDirError",
        "NoProcessGroupError",
        "RankMismatchError",
    }
    for cls in classes:
        builtins = [
            b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)
        ]
        assert issubclass(cls, errors.RatlibError) and builtins, cls

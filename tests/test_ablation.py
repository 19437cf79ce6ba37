"""examples/ablation: study expansion and names, results file, summary, and whole studies through the driver
(each run its own torchrun launch) against the toy example in tests/ablation_toy/: a run that raises, is
SIGKILLed, exits through os._exit, aborts like a CUDA error or hangs past its deadline is recorded as failed and
the next starts clean; a SIGTERM to the driver stops the run at its checkpoint and --resume continues it; plus
end-to-end studies over the segmentation example. The Slurm (srun steps) study is in tests/launchers/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from example_helpers import _restore_logging, load_script  # noqa: F401  (autouse fixture)
from suite_rules import in_ci

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "examples" / "ablation" / "run.py"
TOY = ROOT / "tests" / "ablation_toy" / "train.py"
SEGMENTATION = ROOT / "examples" / "segmentation" / "train.py"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # ranks on CPU and gloo, also on a GPU machine
TIMEOUT_S = 60  # distributed.timeout_s of the toy studies
NEVER_S = 3600  # a collective timeout no test outlives: a rank that waited for it fails at run_on_ranks' limit


R = load_script(RUN_PY, "ablation_run")
au = sys.modules["ablation_utils"]


def write_study(tmp_path: Path, name: str = "study.yaml", timeout_s: int = TIMEOUT_S, **keys) -> Path:
    """A study of the toy example on the CPU: 2 epochs of a few steps each, results under tmp_path/out."""
    study = {
        "name": "toy",
        "base": str(TOY),
        "output_dir": str(tmp_path / "out"),
        "device": "cpu",
        "overrides": {
            "training.num_epochs": 2,
            "training.batch_size": 32,
            "training.optimizer.lr": 1e-2,
            "distributed.timeout_s": timeout_s,
        },
    }
    study.update(keys)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def results(tmp_path: Path) -> list[dict]:
    path = tmp_path / "out" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def driver(study: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """The driver as a user starts it: one process, which starts each run itself."""
    return subprocess.run(
        [sys.executable, str(RUN_PY), "--config", str(study), *args],
        env={**os.environ, **NO_GPU, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _out(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"


# ----------------------------------------------------------------------------------------------
# Study file, variants and names (no processes)


def study_cfg(**keys) -> au.StudyConfig:
    return au.StudyConfig(**keys)


def test_grid_variants_and_seeds_give_stable_readable_names_and_folders() -> None:
    s = study_cfg(
        output_dir="out",
        seeds=[0, 1],
        grid={"model": {"feature_dims": [16, 32]}, "training.optimizer.lr": [1e-3, 3e-4]},
        variants=[{"overrides": {"model.num_blocks": 2}}, {"name": "no-flip", "overrides": {"data.flip": False}}],
    )
    runs = au.make_runs(s)
    names = list(dict.fromkeys(r.name for r in runs))
    assert names == [
        "base",
        "feature_dims=16,lr=0.001",
        "feature_dims=16,lr=0.0003",
        "feature_dims=32,lr=0.001",
        "feature_dims=32,lr=0.0003",
        "num_blocks=2",
        "no-flip",
    ]
    assert [r.run for r in runs[:3]] == ["base/seed0", "base/seed1", "feature_dims=16,lr=0.001/seed0"]
    assert runs[2].dir == str(Path("out") / "feature_dims=16,lr=0.001" / "seed0")
    assert runs[2].overrides == {"model.feature_dims": 16, "training.optimizer.lr": 0.001}
    assert [r.run for r in au.make_runs(s)] == [r.run for r in runs]  # the same study, the same names
    strings = runs[2].override_strings(["training.num_epochs=1"])
    assert strings == [
        "training.num_epochs=1",
        "model.feature_dims=16",
        "training.optimizer.lr=0.001",
        "training.seed=0",
        f"output_dir={json.dumps(runs[2].dir)}",
    ]
    # two keys with the same last part are named in full; values of every kind make safe folder names
    shorts = au.short_keys(["model.width", "data.width", "model.norm"])
    assert shorts == {"model.width": "model.width", "data.width": "data.width", "model.norm": "norm"}
    assert (
        au.variant_name({"model.dims": [8, 16], "x.flag": True, "x.path": "a b/c", "x.n": None}, {})
        == "model.dims=8_16,x.flag=true,x.path=a-b-c,x.n=null"
    )
    long = au.variant_name({f"k{i}": "v" * 10 for i in range(20)}, {})
    assert len(long) <= au.NAME_MAX and long == au.variant_name({f"k{i}": "v" * 10 for i in range(20)}, {})


@pytest.mark.parametrize(
    "keys,expected",
    [
        (
            {"variants": [{"name": "a", "overrides": {"x.y": 1}}, {"name": "a", "overrides": {"x.y": 2}}]},
            r"already used by variants\[0\]",
        ),
        ({"variants": [{"name": "logs"}]}, "reserved"),
        ({"variants": [{"name": "a/b"}]}, "folder name"),
        ({"grid": {"output_dir": ["a", "b"]}}, "cannot vary"),
        ({"grid": {"model.width": 8}}, "expected a non-empty list"),
        ({"seeds": [0, 1], "variants": [{"overrides": {"training.seed": 3}}]}, "use one of them"),
        ({"include_base": False}, "nothing to run"),
    ],
)
def test_invalid_studies_are_one_message(keys: dict, expected: str) -> None:
    with pytest.raises(au.StudyError, match=expected):
        au.make_runs(study_cfg(**keys))


def test_command_line_overrides_split_into_study_and_run_keys() -> None:
    study, runs = au.split_overrides(
        ["seeds=[0,1]", "output_dir=/tmp/x", "training.num_epochs=1"], ["training", "model", "output_dir"]
    )
    assert study == ["seeds=[0,1]", "output_dir=/tmp/x"] and runs == ["training.num_epochs=1"]
    with pytest.raises(au.StudyError, match="did you mean 'seeds'"):
        au.split_overrides(["seedz=[0]"], ["training"])


def test_smoke_on_the_command_line_wins_over_the_studys_run_wide_epochs() -> None:
    smoke_keys = ["data.limit", "training.max_steps", "training.num_epochs"]
    study = {"training.num_epochs": 10, "training.optimizer.lr": 0.01}
    assert au.smoke_common(study, ["smoke=true"], smoke_keys) == (
        {"training.optimizer.lr": 0.01},
        ["training.num_epochs"],
    )
    # a key given on the command line stays theirs; smoke=false or no smoke changes nothing
    assert au.smoke_common(study, ["smoke=true", "training.num_epochs=2"], smoke_keys) == (study, [])
    assert au.smoke_common(study, ["smoke=false"], smoke_keys) == (study, [])
    assert au.smoke_common(study, ["training.num_epochs=2"], smoke_keys) == (study, [])


def test_study_file_typo_names_the_line_and_closest_key(tmp_path: Path) -> None:
    path = write_study(tmp_path, seed=[0, 1])
    with pytest.raises(R.ConfigError, match=r"seed \(line \d+\): unknown key; did you mean 'seeds'"):
        R.read_study(str(path), [])


# ----------------------------------------------------------------------------------------------
# results.jsonl and the summary (no processes)


def test_results_append_survives_a_torn_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "results.jsonl"
    au.append_jsonl(path, {"run": "a", "final": {"x": float("nan")}})
    with open(path, "a") as f:
        f.write('{"run": "b", "fin')  # a write cut short by a crash
    au.append_jsonl(path, {"run": "c"})
    records = au.read_jsonl(path)
    assert [r["run"] for r in records] == ["a", "c"] and records[0]["final"]["x"] is None
    assert "line 2 is not JSON" in caplog.text
    assert (
        au.latest_records([{"run": "a", "status": "failed"}, {"run": "a", "status": "finished"}])["a"]["status"]
        == "finished"
    )


def _record(run: str, name: str, value: float | None, *, status: str = "finished", overrides=None) -> dict:
    return {
        "run": run,
        "name": name,
        "status": status,
        "overrides": overrides or {},
        "final": {} if value is None else {"dice": value},
        "best": {} if value is None else {"dice": value + 0.01},
        "wall_time_s": 2.0,
        "peak_memory_max_gib": 1.5,
        "error": {"rank": 1, "type": "ValueError", "message": "boom"} if status == "failed" else None,
    }


def test_summary_sorts_by_metric_with_deltas_and_seed_spread(tmp_path: Path) -> None:
    records = {}
    for seed, (b, w, n) in enumerate([(0.80, 0.85, 0.70), (0.82, 0.87, 0.72), (0.78, 0.86, 0.74)]):
        records[f"base/seed{seed}"] = _record(f"base/seed{seed}", "base", b)
        records[f"wide/seed{seed}"] = _record(f"wide/seed{seed}", "wide", w, overrides={"model.feature_dims": 32})
        records[f"narrow/seed{seed}"] = _record(f"narrow/seed{seed}", "narrow", n, overrides={"model.feature_dims": 4})
    records["deep/seed0"] = _record("deep/seed0", "deep", None, status="failed", overrides={"model.num_blocks": 6})
    rows = au.summary_rows(records, [], "dice", "max")
    assert [r.name for r in rows] == ["wide", "base", "narrow", "deep"]
    table = au.summary_table(rows, "dice", "max")
    lines = table.splitlines()
    assert "dice (mean ± sd)" in lines[0]
    assert lines[2].startswith("| 1 | wide | model.feature_dims=32 | 0.8600 ± 0.0100 | +0.0600 (+7.5%) | 0.8800 | 3/3")
    assert "| **base** |" in lines[3] and "| 3 | narrow |" in lines[4] and "-0.0800 (-10.0%)" in lines[4]
    assert "| deep |" in lines[5] and "failed" in lines[5]
    text = au.summary_markdown(rows, title="t", metric="dice", mode="max", header=["- x"])
    assert "## Failed runs" in text and "`deep/seed0`: rank 1: ValueError: boom" in text
    assert [r.name for r in au.summary_rows(records, [], "dice", "min")][:3] == ["narrow", "base", "wide"]
    if in_ci() or importlib.util.find_spec("matplotlib") is not None:  # CI installs the plot extra
        assert au.summary_png(rows, tmp_path / "s.png", title="t", metric="dice", mode="max")
        assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_png_is_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rows = au.summary_rows({"a": _record("a", "a", 0.5)}, [], "dice", "max")
    assert au.summary_png(rows, tmp_path / "s.png", title="t", metric="dice", mode="max") is False
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------------------------
# The driver in this process, each run a one-rank torchrun launch: a study, --resume, --retry-failed


@pytest.mark.distributed
def test_a_study_records_each_run_once_and_resume_and_retry_failed_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study = write_study(
        tmp_path,
        grid={"model.hidden": [4]},
        variants=[{"name": "broken", "overrides": {"fault.rank": 0, "fault.at": "step"}}],
    )
    assert R.main(["--config", str(study)]) == 0
    out = capsys.readouterr().out
    assert "| **base** |" in out and "skipped: matplotlib is not installed (pip install 'ratlib[plot]')" in out
    recs = results(tmp_path)
    assert [(r["run"], r["status"]) for r in recs] == [
        ("base", "finished"),
        ("hidden=4", "finished"),
        ("broken", "failed"),
    ]
    error = recs[2]["error"]
    assert (error["rank"], error["type"], error["message"]) == (0, "RuntimeError", "toy fault on rank 0 at a step")
    assert error["lines"][-1] == "RuntimeError: toy fault on rank 0 at a step" and Path(error["log"]).is_file()
    assert recs[0]["world_size"] == 1 and recs[0]["final"]["score"] == recs[0]["best"]["score"] > 0.2
    assert recs[0]["best"]["epoch"] == 1 and recs[0]["peak_memory_max_gib"] > 0 and recs[0]["exit_code"] == 0
    out_dir = tmp_path / "out"
    assert (out_dir / "summary.md").is_file() and not (out_dir / "summary.png").exists()
    assert json.loads((out_dir / "base" / "outcome.json").read_text())["status"] == "finished"
    assert (out_dir / "base" / "logs" / "rank0.log").is_file() and (out_dir / "logs" / "base.log").is_file()

    assert R.main(["--config", str(study)]) == 2  # a second fresh start would mix two studies: refused
    assert R.main(["--config", str(study), "--resume"]) == 0  # finished and failed runs are both recorded
    assert len(results(tmp_path)) == 3
    monkeypatch.setenv("ABLATION_TOY_NO_FAULTS", "1")  # "fixed the bug"
    assert R.main(["--config", str(study), "--resume", "--retry-failed"]) == 0
    recs = results(tmp_path)
    assert [(r["run"], r["status"]) for r in recs[3:]] == [("broken", "finished")]
    assert (out_dir / "broken.failed1").is_dir()  # the failed attempt, kept aside
    summary = (out_dir / "summary.md").read_text()
    assert "3 finished, 0 failed" in summary and "Failed runs" not in summary


def test_dry_run_validates_and_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text("model: {depth: 2}\n")  # a base config without a training section
    study = write_study(tmp_path, config="base.yaml", grid={"model.hidden": [4, 16]})  # relative to the study
    assert R.main(["--config", str(study), "--dry-run", "seeds=[0,1]", "training.num_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "6 runs of" in out and "hidden=16/seed1" in out and "every config is valid" in out
    assert f"config {tmp_path / 'base.yaml'}" in out
    assert not (tmp_path / "out").exists()


def test_invalid_variants_are_reported_before_anything_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    study = write_study(
        tmp_path,
        grid={"model.hidden": [4, 16]},
        variants=[
            {"name": "typo", "overrides": {"model.hiden": 8}},
            {"name": "negative-lr", "overrides": {"training.optimizer.lr": -1}},
        ],
    )
    assert R.main(["--config", str(study)]) == 2
    err = caplog.text
    assert "2 of 5 runs have an invalid config; nothing was trained" in err
    assert "run typo (model.hiden=8)" in err and "model.hiden" in err and "did you mean 'model.hidden'" in err
    assert "run negative-lr" in err and "training.optimizer.lr" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no run folder, no results


def test_the_driver_refuses_to_run_under_a_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert R.main(["--config", str(write_study(tmp_path))]) == 2
    assert "runs as one process and starts each run itself" in caplog.text


def test_a_base_without_an_example_entry_is_one_message(tmp_path: Path) -> None:
    base = tmp_path / "train.py"
    base.write_text("CONFIG_SCHEMA = None\nMAIN_METRIC = 'x'\n")
    with pytest.raises(au.StudyError, match="its EXAMPLE entry lacks 'schema', 'metric'"):
        R.load_example(base)
    base.write_text("EXAMPLE = {'schema': object, 'metric': 'x', 'mode': 'up'}\n")
    with pytest.raises(au.StudyError, match="has mode='up'"):
        R.load_example(tmp_path / "train.py")


def test_a_failure_is_described_from_the_launchers_report_and_the_ranks_own_lines(tmp_path: Path) -> None:
    """torchrun's "Root Cause" block and srun's task lines name the rank; its own stderr gives the lines."""
    run = tmp_path / "run"
    (run / "logs" / "torchrun" / "x" / "attempt_0" / "1").mkdir(parents=True)
    (run / "logs" / "torchrun" / "x" / "attempt_0" / "1" / "stderr.log").write_text(
        "warming up\nRuntimeError: CUDA error: device-side assert triggered\nFatal Python error: Aborted\n"
    )
    launch = tmp_path / "launch.log"
    launch.write_text(
        "Root Cause (first observed failure):\n[0]:\n  time      : now\n  host      : h\n"
        "  rank      : 1 (local_rank: 1)\n  exitcode  : -6 (pid: 12)\n"
    )
    error = au.describe_failure(run, launch, 1)
    assert (error["rank"], error["type"]) == (1, "RuntimeError")
    assert (
        error["message"] == "CUDA error: device-side assert triggered"
        and error["how"] == "rank 1 was killed by signal 6"
    )
    launch.write_text("0: fine\n1: ValueError: bad batch\nsrun: error: n2: task 1: Exited with exit code 1\n")
    error = au.describe_failure(tmp_path / "other", launch, 1)
    assert (error["rank"], error["type"], error["message"]) == (1, "ValueError", "bad batch")
    assert error["how"] == "task 1: Exited with exit code 1"
    assert au.describe_failure(tmp_path / "other", launch, -9, timed_out=30.0)["type"] == "Timeout"


# ----------------------------------------------------------------------------------------------
# Two ranks per run: failures are isolated, a signal to the driver stops and --resume continues


@pytest.mark.distributed
@pytest.mark.slow
def test_each_kind_of_failure_is_recorded_and_the_next_run_starts_clean(tmp_path: Path) -> None:
    fault = {"fault.rank": 1, "fault.at": "step"}
    study = write_study(
        tmp_path,
        timeout_s=NEVER_S,  # no run may wait for the process group's timeout: the driver or its launcher ends it
        nproc_per_node=2,
        run_timeout_s=45,
        include_base=False,
        variants=[
            {"name": "raises", "overrides": {"fault.rank": 1, "fault.at": "build"}},  # rank 0 waits in DDP
            {"name": "sigkill", "overrides": {**fault, "fault.how": "kill"}},
            {"name": "os-exit", "overrides": {**fault, "fault.how": "exit"}},
            {"name": "cuda-abort", "overrides": {"fault.rank": 0, "fault.at": "step", "fault.how": "abort"}},
            {"name": "hangs", "overrides": {**fault, "fault.how": "hang"}},
            {"name": "fine", "overrides": {"model.hidden": 16}},
        ],
    )
    done = driver(study, timeout=600)
    assert done.returncode == 0, _out(done)
    recs = {r["run"]: r for r in results(tmp_path)}
    assert list(recs) == ["raises", "sigkill", "os-exit", "cuda-abort", "hangs", "fine"]  # the study's order
    assert (
        recs["fine"]["status"] == "finished"
        and recs["fine"]["world_size"] == 2
        and recs["fine"]["final"]["score"] > 0.2
    )
    expected = {
        "raises": (1, "ValueError", "toy fault on rank 1 while building the model"),
        "sigkill": (1, "Exit", "rank 1 was killed by signal 9"),
        "os-exit": (1, "Exit", "rank 1 exited with code 1"),
        "cuda-abort": (0, "RuntimeError", "CUDA error: an illegal memory access was encountered"),
    }
    for name, (rank, kind, text) in expected.items():
        error = recs[name]["error"]
        assert recs[name]["status"] == "failed" and (error["rank"], error["type"], error["message"]) == (
            rank,
            kind,
            text,
        )
        assert error["lines"] and Path(error["log"]).is_file() and recs[name]["final"] == {}
    assert any("toy fault on rank 1: kill at a step" in line for line in recs["sigkill"]["error"]["lines"])
    hang = recs["hangs"]["error"]
    assert hang["type"] == "Timeout" and "run_timeout_s=45" in hang["message"] and recs["hangs"]["wall_time_s"] < 90
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "`raises`: rank 1: ValueError: toy fault on rank 1 while building the model" in summary
    assert not [p for p in _processes() if str(TOY) in p], "a run's process outlived the study"


def _processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            found.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("target", ["driver", "rank 1"])
def test_a_signal_stops_the_run_at_its_checkpoint_and_resume_continues_it_to_the_same_result(
    tmp_path: Path, target: str
) -> None:
    """SIGTERM to the driver (what Slurm's --signal=B:TERM does) or to rank 1 of the running run: every rank stops
    at one step with its checkpoint, nothing is recorded, the driver exits 75; --resume continues the run from its
    middle and records each run once, with the score of an uninterrupted run of the same config (run "same")."""
    study = write_study(
        tmp_path,
        nproc_per_node=2,
        include_base=False,
        overrides={"training.num_epochs": 4, "training.batch_size": 32, "fault.sleep_s": 1.5},
        variants=[{"name": "stopped"}, {"name": "same", "overrides": {"training.seed": 0}}],
    )
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "--config", str(study)],
        env={**os.environ, **NO_GPU, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "out" / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):  # its first epoch is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    if target == "driver":
        proc.send_signal(signal.SIGTERM)
    else:
        rank1 = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/environ") if _is_rank(p, "1")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 75, output
    assert not results(tmp_path) and "nothing is recorded for them" in output
    assert json.loads((tmp_path / "out" / "stopped" / "outcome.json").read_text())["status"] == "stopped"

    done = driver(study, "--resume")
    assert done.returncode == 0, _out(done)
    recs = results(tmp_path)
    assert [(r["run"], r["status"], r["resumed"]) for r in recs] == [
        ("stopped", "finished", True),
        ("same", "finished", False),
    ]
    assert recs[0]["final"]["score"] == recs[1]["final"]["score"]  # the resume is exact
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]  # each epoch once: the resume finished the stopped one from its middle


def _is_rank(environ: Path, rank: str) -> bool:
    with contextlib.suppress(OSError):
        data = environ.read_bytes().split(b"\0")
        return f"RANK={rank}".encode() in data and str(TOY).encode() in (environ.parent / "cmdline").read_bytes()
    return False


@pytest.mark.distributed
@pytest.mark.slow
def test_parallel_runs_overlap_each_on_its_own_launch(tmp_path: Path) -> None:
    study = write_study(tmp_path, parallel=2, grid={"model.hidden": [4, 16]}, include_base=False)
    done = driver(study)
    assert done.returncode == 0, _out(done)
    recs = results(tmp_path)
    assert sorted(r["run"] for r in recs) == ["hidden=16", "hidden=4"] and all(r["status"] == "finished" for r in recs)
    spans = sorted((r["started_at"], r["started_at"] + r["wall_time_s"]) for r in recs)
    assert spans[1][0] < spans[0][1], spans  # the second started before the first ended


# ----------------------------------------------------------------------------------------------
# The segmentation example, end to end


@pytest.mark.distributed
@pytest.mark.slow
def test_segmentation_study_on_two_ranks_learns(tmp_path: Path) -> None:
    study = tmp_path / "seg.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "seg",
                "base": "segmentation",
                "output_dir": str(tmp_path / "out"),
                "device": "cpu",
                "nproc_per_node": 2,
                "overrides": {"training.num_epochs": 6, "distributed.timeout_s": 120},  # the shipped config, shorter
                "grid": {"model.feature_dims": [4]},
            }
        )
    )
    done = driver(study)
    assert done.returncode == 0, _out(done)
    recs = results(tmp_path)
    assert [r["run"] for r in recs] == ["base", "feature_dims=4"]
    assert all(r["status"] == "finished" and r["metric"] == "dice" and r["world_size"] == 2 for r in recs)
    assert recs[0]["final"]["dice"] > 0.7, recs[0]["final"]  # it learns (untrained: below 0.2)
    assert all((tmp_path / "out" / r["run"] / "metrics.jsonl").is_file() for r in recs)
    assert "| **base** |" in done.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_shipped_study_with_smoke_is_one_short_epoch_per_run(tmp_path: Path) -> None:
    # The shipped study sets training.num_epochs for every run; smoke=true on the command line is a quick pass
    # over every variant: one epoch of at most 10 steps on 16 slices, one metrics row with both ranks' peak memory.
    study = ROOT / "examples" / "ablation" / "ablation.yaml"
    done = driver(study, f"output_dir={tmp_path / 'out'}", "seeds=[0]", "smoke=true", timeout=600)
    assert done.returncode == 0, _out(done)
    recs = results(tmp_path)
    shipped = yaml.safe_load(study.read_text())
    assert len(recs) == 1 + len(shipped.get("variants", [])) + math.prod(len(v) for v in shipped["grid"].values())
    assert all(r["status"] == "finished" for r in recs)
    for rec in recs:
        rows = [json.loads(line) for line in (Path(rec["dir"]) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "epoch" in r]
        assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["train_samples"] == 16
        assert 1 <= rows[0]["step"] <= 10  # smoke's training.max_steps, not the study's epochs
        assert len(rows[0]["peak_memory_gib"]) == 2 and rows[0]["peak_memory_max_rank"] in (0, 1)
    assert "leaving out the study's training.num_epochs" in done.stdout + done.stderr

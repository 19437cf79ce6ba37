"""examples/ablation: study expansion and names, results file, summary, and whole studies on 2 real ranks
(failures on one rank, a SIGKILL and --resume, invalid variants) against the toy example in
tests/ablation_toy/, plus one end-to-end study over the segmentation example.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
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
    """A study of the toy example: 2 epochs of a few steps each, results under tmp_path/out."""
    study = {
        "name": "toy",
        "base": str(TOY),
        "output_dir": str(tmp_path / "out"),
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


def run_study(run_on_ranks, study: Path, *args: str, timeout: float = 120):
    return run_on_ranks(RUN_PY, 2, args=["--config", str(study), *args], env=NO_GPU, timeout=timeout)


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
        ({"grid": {"distributed.timeout_s": [1, 2]}}, "cannot vary"),
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
# One process (in this process): a whole study, --resume, --retry-failed, no matplotlib


def test_single_process_study_resume_and_retry_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    try:
        study = write_study(
            tmp_path,
            grid={"model.hidden": [4, 16]},
            variants=[{"name": "broken", "overrides": {"fault.rank": 0, "fault.at": "step"}}],
        )
        assert R.main(["--config", str(study)]) == 0
        out = capsys.readouterr().out
        assert "| **base** |" in out and "skipped: matplotlib is not installed (pip install 'ratlib[plot]')" in out
        recs = results(tmp_path)
        assert [(r["run"], r["status"]) for r in recs] == [
            ("base", "finished"),
            ("hidden=4", "finished"),
            ("hidden=16", "finished"),
            ("broken", "failed"),
        ]
        assert recs[3]["error"] == {"rank": 0, "type": "RuntimeError", "message": "toy fault on rank 0 at step 2"}
        assert recs[0]["world_size"] == 1 and recs[0]["final"]["score"] == recs[0]["best"]["score"]
        assert recs[0]["best"]["epoch"] == 1 and recs[0]["peak_memory_max_gib"] > 0
        assert (tmp_path / "out" / "summary.md").is_file() and not (tmp_path / "out" / "summary.png").exists()

        assert R.main(["--config", str(study)]) == 2  # a second fresh start would mix two studies: refused
        assert R.main(["--config", str(study), "--resume"]) == 0  # finished and failed runs are both recorded
        assert len(results(tmp_path)) == 4
        monkeypatch.setenv("ABLATION_TOY_NO_FAULTS", "1")  # "fixed the bug"
        assert R.main(["--config", str(study), "--resume", "--retry-failed"]) == 0
        recs = results(tmp_path)
        assert [(r["run"], r["status"]) for r in recs[4:]] == [("broken", "finished")]
        assert (tmp_path / "out" / "broken.failed1").is_dir()  # the failed attempt, kept aside
        summary = (tmp_path / "out" / "summary.md").read_text()
        assert "4 finished, 0 failed" in summary and "Failed runs" not in summary
    finally:
        torch.set_num_threads(before)


def test_dry_run_validates_and_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text("model: {depth: 2}\n")  # a base config without a training section
    study = write_study(tmp_path, config="base.yaml", grid={"model.hidden": [4, 16]})  # relative to the study
    assert R.main(["--config", str(study), "--dry-run", "seeds=[0,1]", "training.num_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "6 runs of" in out and "hidden=16/seed1" in out and "every config is valid" in out
    assert f"config {tmp_path / 'base.yaml'}" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"]])
def test_the_deepspeed_launcher_s_local_rank_flag_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    study = write_study(tmp_path, grid={"model.hidden": [4, 16]})
    assert R.main(["--config", str(study), *flag, "--dry-run"]) == 0  # one process: the environment says rank 0
    assert "every config is valid" in capsys.readouterr().out


def test_a_base_without_an_example_entry_is_one_message(tmp_path: Path) -> None:
    base = tmp_path / "train.py"
    base.write_text("CONFIG_SCHEMA = None\nMAIN_METRIC = 'x'\n\ndef train(cfg, **kw):\n    return {}\n")
    with pytest.raises(au.StudyError, match="its EXAMPLE entry lacks 'schema', 'train', 'metric'"):
        R.load_example(base)
    base.write_text("EXAMPLE = {'schema': object, 'train': print, 'metric': 'x', 'mode': 'up'}\n")
    with pytest.raises(au.StudyError, match="has mode='up'"):
        R.load_example(tmp_path / "train.py")


# ----------------------------------------------------------------------------------------------
# Two ranks


@pytest.mark.distributed
@pytest.mark.slow
def test_four_variants_on_two_ranks_give_four_result_lines(tmp_path: Path, run_on_ranks) -> None:
    study = write_study(tmp_path, grid={"model.hidden": [4, 16]}, variants=[{"overrides": {"model.depth": 2}}])
    run = run_study(run_on_ranks, study).check()
    recs = results(tmp_path)
    assert [r["run"] for r in recs] == ["base", "hidden=4", "hidden=16", "depth=2"]  # once each: rank 1 writes none
    assert all(r["status"] == "finished" and r["world_size"] == 2 and len(r["peak_memory_gib"]) == 2 for r in recs)
    assert all(0 < r["final"]["score"] <= 1 and r["wall_time_s"] > 0 for r in recs)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "base",
        "hidden=4",
        "hidden=16",
        "depth=2",
        "logs",
        "results.jsonl",
        "summary.md",
        "study.yaml",
    }
    for name in ("base", "depth=2"):
        assert (out / name / "config.yaml").is_file() and (out / name / "metrics.jsonl").is_file()
    assert {"rank0.log", "rank1.log"} <= {p.name for p in (out / "logs").iterdir()}
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # the header and one row per variant
    stdout0, stdout1 = run.stdouts
    assert "| **base** |" in stdout0 and f"results: {out / 'results.jsonl'}" in stdout0
    assert "summary:" in stdout0 and "plot:" in stdout0
    assert "| **base** |" not in stdout1  # the table is printed once
    if in_ci() or importlib.util.find_spec("matplotlib") is not None:  # CI installs the plot extra
        assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.distributed
@pytest.mark.slow
def test_a_run_that_raises_on_rank_1_only_is_recorded_and_the_study_goes_on(tmp_path: Path, run_on_ranks) -> None:
    study = write_study(
        tmp_path,
        timeout_s=NEVER_S,
        variants=[
            {"name": "fails-building", "overrides": {"fault.rank": 1, "fault.at": "build"}},  # rank 0 waits in DDP
            {"name": "fails-mid-epoch", "overrides": {"fault.rank": 1, "fault.at": "step"}},  # rank 0 in an allreduce
            {"name": "rank-0-fails-at-end", "overrides": {"fault.rank": 0, "fault.at": "end"}},  # rank 1 in a broadcast
            {"overrides": {"model.hidden": 16}},
        ],
    )
    run = run_study(run_on_ranks, study, timeout=300).check()  # finished: nobody waited for the 1 h timeout
    recs = {r["run"]: r for r in results(tmp_path)}
    assert list(recs) == ["base", "fails-building", "fails-mid-epoch", "rank-0-fails-at-end", "hidden=16"]
    assert recs["base"]["status"] == recs["hidden=16"]["status"] == "finished"
    assert recs["fails-building"]["error"] == {
        "rank": 1,
        "type": "ValueError",
        "message": "toy fault on rank 1 while building the model",
    }
    assert recs["fails-mid-epoch"]["error"]["rank"] == 1
    assert recs["fails-mid-epoch"]["error"]["message"].startswith("toy fault on rank 1 at step")
    assert recs["rank-0-fails-at-end"]["error"]["rank"] == 0
    for name, order in (("fails-building", [1, 0]), ("fails-mid-epoch", [1, 0]), ("rank-0-fails-at-end", [0, 1])):
        assert recs[name]["status"] == "failed" and recs[name]["final"] == {}
        assert [e["rank"] for e in recs[name]["errors"]] == order  # the other rank's error follows from the cause
    assert "toy fault on rank 1 while building the model" in run.outputs[1]  # the traceback, on rank 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "`fails-building`: rank 1: ValueError: toy fault on rank 1 while building the model" in summary


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun's workers, which it starts in their own sessions)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_sigkill_after_two_runs_then_resume_runs_only_the_rest(tmp_path: Path, run_on_ranks) -> None:
    study = write_study(
        tmp_path,
        grid={"model.hidden": [4, 8, 16]},  # 4 runs, 0.6 s or more each
        overrides={
            "training.num_epochs": 2,
            "training.batch_size": 32,
            "fault.sleep_s": 0.3,
            "distributed.timeout_s": TIMEOUT_S,
        },
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(NO_GPU, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    log = open(tmp_path / "first.log", "wb")
    launcher = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(RUN_PY), "--config", str(study)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(results(tmp_path)) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            workers = _children(launcher.pid) or workers
            time.sleep(0.05)
        workers = _children(launcher.pid) or workers
        launcher.send_signal(signal.SIGKILL)  # the launcher dies with its rendezvous store
        launcher.wait()
        assert len(workers) == 2
        # The workers finish the run they are in and stop at the next exchange: nothing more is recorded.
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "workers outlived their launcher by a minute"
    finally:
        for pid in [launcher.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
    first = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["run"] for line in first] == ["base", "hidden=4"]
    assert "study stopped" in (tmp_path / "first.log").read_text()

    run = run_study(run_on_ranks, study, "--resume").check()
    recs = results(tmp_path)
    assert (tmp_path / "out" / "results.jsonl").read_text().splitlines()[:2] == first  # untouched
    assert [r["run"] for r in recs] == ["base", "hidden=4", "hidden=8", "hidden=16"]  # exactly one line per run
    assert all(r["status"] == "finished" for r in recs)
    assert "2 of 4 runs recorded as finished" in run.outputs[0] and "2 to run" in run.outputs[0]
    assert "[1/2] hidden=8" in run.outputs[0]


def signal_study(tmp_path: Path, variants: list[int]) -> Path:
    """A toy study whose runs end with SIGTERM to rank 1 after their last collective (ABLATION_TOY_NO_FAULTS=1
    turns that off)."""
    overrides = {"training.num_epochs": 2, "training.batch_size": 32, "distributed.timeout_s": TIMEOUT_S}
    overrides.update({"fault.rank": 1, "fault.at": "end", "fault.signal": "SIGTERM"})
    return write_study(tmp_path, overrides=overrides, **({"grid": {"model.hidden": variants}} if variants else {}))


@pytest.mark.distributed
def test_a_signal_after_a_runs_last_collective_stops_the_study_after_that_run(tmp_path: Path, run_on_ranks) -> None:
    """Once meant a dead rank 1 (the signal met the default action) and rank 0 waiting 5 minutes for its
    outcome. Now the study holds the handlers: the run is recorded, every rank stops before the next run
    with 75, and --resume runs only the rest."""
    study = signal_study(tmp_path, [4, 8])
    first = run_study(run_on_ranks, study)
    assert first.returncodes == [75, 75], str(first)
    assert [r["run"] for r in results(tmp_path)] == ["base"] and results(tmp_path)[0]["status"] == "finished"
    assert "study preempted after run base (1 of 3 runs of this launch done and recorded)" in first.outputs[0]
    assert "rank 1 got SIGTERM" in first.outputs[0] and "rank 1 got SIGTERM" in first.outputs[1]

    env = {**NO_GPU, "ABLATION_TOY_NO_FAULTS": "1"}
    run = run_on_ranks(RUN_PY, 2, args=["--config", str(study), "--resume"], env=env, timeout=120).check()
    assert [r["run"] for r in results(tmp_path)] == ["base", "hidden=4", "hidden=8"]  # one line per run
    assert "1 of 3 runs recorded as finished" in run.outputs[0]


@pytest.mark.distributed
def test_a_signal_in_the_last_run_after_its_last_collective_ends_a_complete_study_normally(
    tmp_path: Path, run_on_ranks
) -> None:
    run = run_study(run_on_ranks, signal_study(tmp_path, [])).check()
    assert [r["run"] for r in results(tmp_path)] == ["base"]
    assert "SIGTERM after the last run: the study is complete; exiting normally" in run.outputs[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_invalid_variants_are_reported_before_anything_trains(tmp_path: Path, run_on_ranks) -> None:
    study = write_study(
        tmp_path,
        grid={"model.hidden": [4, 16]},
        variants=[
            {"name": "typo", "overrides": {"model.hiden": 8}},
            {"name": "negative-lr", "overrides": {"training.optimizer.lr": -1}},
        ],
    )
    run = run_study(run_on_ranks, study)
    assert run.returncodes == [2, 2] and not run.timed_out
    err = run.outputs[0]
    assert "2 of 5 runs have an invalid config; nothing was trained" in err
    assert "run typo (model.hiden=8)" in err and "model.hiden" in err and "did you mean 'model.hidden'" in err
    assert "run negative-lr" in err and "training.optimizer.lr" in err
    assert "invalid config" not in run.outputs[1]  # reported once, by the main rank
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no run folder, no results


# ----------------------------------------------------------------------------------------------
# The segmentation example, end to end


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not SEGMENTATION.is_file(), reason="examples/segmentation/train.py is not there yet")
def test_segmentation_study_on_two_ranks(tmp_path: Path, run_on_ranks) -> None:
    study = tmp_path / "seg.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "seg",
                "base": "segmentation",
                "output_dir": str(tmp_path / "out"),
                "overrides": {
                    "training.num_epochs": 1,
                    "data.synthetic.num_cases": 4,
                    "data.synthetic.shape": [32, 32, 8],
                    "model.num_blocks": 2,
                    "distributed.timeout_s": 120,
                },
                "grid": {"model.feature_dims": [4, 8]},
            }
        )
    )
    run = run_on_ranks(RUN_PY, 2, args=["--config", str(study)], env=NO_GPU, timeout=240).check()
    recs = results(tmp_path)
    assert [r["run"] for r in recs] == ["base", "feature_dims=4", "feature_dims=8"]
    assert all(r["status"] == "finished" and r["metric"] == "dice" and 0 <= r["final"]["dice"] <= 1 for r in recs)
    assert all((tmp_path / "out" / r["run"] / "metrics.jsonl").is_file() for r in recs)
    assert "| **base** |" in run.stdouts[0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not SEGMENTATION.is_file(), reason="examples/segmentation/train.py is not there yet")
def test_shipped_study_with_smoke_on_two_ranks_is_one_short_epoch_per_run(tmp_path: Path, run_on_ranks) -> None:
    # The shipped study sets training.num_epochs: 10 for every run; smoke=true on the command line is a quick
    # pass over every variant: one epoch of at most 10 steps on 16 slices, one metrics row with both ranks'
    # peak memory.
    study = ROOT / "examples" / "ablation" / "ablation.yaml"
    run = run_on_ranks(
        RUN_PY,
        2,
        args=[
            "--config",
            str(study),
            f"output_dir={tmp_path / 'out'}",
            "seeds=[0]",
            "smoke=true",
            "distributed.timeout_s=120",
        ],
        env=NO_GPU,
        timeout=240,
    ).check()
    recs = results(tmp_path)
    assert len(recs) == 7 and all(r["status"] == "finished" for r in recs)
    for rec in recs:
        rows = [json.loads(line) for line in (Path(rec["dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["train_samples"] == 16
        assert 1 <= rows[0]["step"] <= 10  # smoke's training.max_steps, not the study's 10 epochs (speed: benchmarks/)
        assert len(rows[0]["peak_memory_gib"]) == 2 and rows[0]["peak_memory_max_rank"] in (0, 1)
    assert "leaving out the study's training.num_epochs=10" in "".join(run.stdouts + run.stderrs)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_preempted_segmentation_study_resumes_the_run_from_its_middle_and_records_nothing_twice(
    tmp_path: Path, run_on_ranks
) -> None:
    """SIGTERM to rank 1 during the first run: every rank stops at one step, the run's checkpoint is written
    and nothing recorded; --resume continues that run from its checkpoint, then the next one."""
    import threading

    import psutil

    study = tmp_path / "seg.yaml"
    overrides = {
        "training.num_epochs": 2,
        "training.batch_size": 4,  # 24 training slices on 2 ranks: 3 steps per epoch
        "training.log_every": 1,
        "data.synthetic.num_cases": 4,
        "data.synthetic.shape": [32, 32, 8],
        "model.num_blocks": 2,
        "distributed.timeout_s": 120,
    }
    spec = {"name": "seg", "base": "segmentation", "output_dir": str(tmp_path / "out"), "overrides": overrides}
    study.write_text(yaml.safe_dump({**spec, "grid": {"model.feature_dims": [4]}}))
    base = tmp_path / "out" / "base"
    sent: list[int] = []

    def signal_rank_1() -> None:
        deadline = time.monotonic() + 200
        while not sent and time.monotonic() < deadline:
            lines = (base / "metrics.jsonl").read_text().splitlines() if (base / "metrics.jsonl").is_file() else []
            if len(lines) >= 2:  # step 1 is done
                ranks = {}
                for p in psutil.Process().children():  # the ranks themselves, not their DataLoader workers
                    with contextlib.suppress(psutil.Error):
                        if str(RUN_PY) in " ".join(p.cmdline()):
                            ranks[p.environ().get("RANK")] = p
                # Rank 0 held still meanwhile, so the signal lands mid-run however loaded the machine is: 6
                # steps go by in well under the 0.1 s poll, and a signal after the run's last agreement stops
                # the study after that run instead (test_a_signal_after_a_runs_last_collective_...).
                ranks["0"].suspend()
                try:
                    ranks["1"].send_signal(signal.SIGTERM)
                    sent.append(ranks["1"].pid)
                    time.sleep(0.2)
                finally:
                    ranks["0"].resume()
            time.sleep(0.02)

    thread = threading.Thread(target=signal_rank_1, daemon=True)
    thread.start()
    first = run_on_ranks(RUN_PY, 2, args=["--config", str(study)], env=NO_GPU, timeout=240)
    thread.join(1)
    assert sent and first.returncodes == [75, 75], str(first)
    assert "study preempted during run base" in first.outputs[0] and not results(tmp_path)
    import torch

    from ratlib import checkpoint

    mid = torch.load(checkpoint.latest(base / "checkpoints", "epoch*.pt"), weights_only=True)
    stopped_at = mid["step"]
    assert f"preemption: stopping at step {stopped_at} on every rank (rank 1 got SIGTERM" in first.outputs[0]

    run = run_on_ranks(RUN_PY, 2, args=["--config", str(study), "--resume"], env=NO_GPU, timeout=240).check()
    recs = results(tmp_path)
    assert [r["run"] for r in recs] == ["base", "feature_dims=4"] and recs[0]["resumed"] is True
    assert "continuing from its checkpoint" in run.outputs[0]
    assert f"resumed from {base / 'checkpoints'}" in run.outputs[0] and 0 < stopped_at < 6
    rows = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))  # every step once
    assert [r["epoch"] for r in rows if "epoch" in r] == [0, 1]
    assert "tensorboard --logdir" in run.stdouts[0]
    if importlib.util.find_spec("tensorboard") is not None:  # each run folder is one TensorBoard run
        assert all(len(list((tmp_path / "out" / r["run"]).glob("events.out.tfevents.*"))) >= 1 for r in recs)
        assert not list((tmp_path / "out").glob("events.out.tfevents.*"))

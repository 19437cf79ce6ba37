"""ratlib.tracking: main rank only, one run across a kill -9 and a resume, and no backend can stop training."""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tracking_targets
from suite_rules import require

from ratlib.errors import RatlibError
from ratlib.io import append_jsonl, read_jsonl
from ratlib.tracking import Backend, Tracker, TrackingError, flatten_config, lr_metrics, memory_metrics


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a TensorBoard run folder, read back with TensorBoard's own EventAccumulator."""
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tracking_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ratlib.tracking" and r.levelno >= level]


# ----------------------------------------------------------------------------------------------
# Main rank only


@pytest.mark.distributed
def test_two_ranks_write_one_tensorboard_run_and_rank_one_creates_nothing(run_on_ranks: Any, tmp_path: Path) -> None:
    require("tensorboard")
    run_on_ranks(tracking_targets.two_ranks, 2, args=(str(tmp_path),), timeout=180).check()
    run = tmp_path / "run"
    events = sorted(p.name for p in run.iterdir() if p.name.startswith("events.out.tfevents"))
    assert len(events) == 1, sorted(p.name for p in run.iterdir())
    assert not [p for p in run.iterdir() if p.is_dir()]  # no second TensorBoard run (add_hparams makes one)
    assert (tmp_path / "own-rank0").is_dir() and not (tmp_path / "own-rank1").exists()
    scalars = tensorboard_scalars(run)
    assert [s for s, _ in scalars["loss"]] == [0, 1, 2, 3, 4]
    for rank in (0, 1):  # the per-rank peak memory, gathered by memory_report on every rank
        assert [s for s, _ in scalars[f"memory/rank{rank}_peak_gib"]] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    assert any(tag.startswith("config") for tag in acc.Tags()["tensors"])  # the config, once, as text


def test_a_non_main_rank_is_inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    started = []

    class Spy(Backend):
        name = "spy"

        def start(self, run: Any) -> None:
            started.append(run)

        def log(self, metrics: dict[str, Any], step: int) -> None:
            started.append(step)

    with Tracker(tmp_path / "run", backends=["jsonl", "tensorboard", Spy()], config={"a": 1}) as tracker:
        assert not tracker.enabled and tracker.backends == []
        tracker.log({"loss": 1.0}, 3)
        with pytest.raises(TrackingError):  # the caller's bug shows on every rank, not only rank 0
            tracker.log({"loss": 1.0}, 2)
    assert not (tmp_path / "run").exists() and started == []
    assert not [t for t in threading.enumerate() if t.name.startswith("ratlib-tracking")]


# ----------------------------------------------------------------------------------------------
# Steps and resume


def test_a_step_that_goes_backwards_is_an_error(tmp_path: Path) -> None:
    with Tracker(tmp_path, backends=["jsonl"]) as tracker:
        tracker.log({"loss": 1.0}, 5)
        tracker.log({"val": 2.0}, 5)  # the same step again (evaluation after training) is fine
        with pytest.raises(TrackingError, match="step 4 goes backwards.*last step logged.*is 5") as err:
            tracker.log({"loss": 1.0}, 4)
        assert isinstance(err.value, RatlibError) and isinstance(err.value, ValueError)
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(TrackingError, match="non-negative int"):
                tracker.log({"loss": 1.0}, bad)  # type: ignore[arg-type]
        state = tracker.state_dict()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [5, 5]
    with Tracker(tmp_path, backends=["jsonl"], resume=state) as resumed, pytest.raises(TrackingError):
        resumed.log({"loss": 1.0}, 4)  # below the step the run resumed from


def test_resume_drops_jsonl_rows_after_the_checkpoint_step(tmp_path: Path) -> None:
    with Tracker(tmp_path, backends=["jsonl"]) as tracker:
        for step in range(4):
            tracker.log({"loss": float(step)}, step)
        state = tracker.state_dict()
        for step in range(4, 8):  # logged after the checkpoint, then the job died
            tracker.log({"loss": float(step)}, step)
    append_jsonl(tmp_path / "metrics.jsonl", {"note": "a row without a step is kept"})
    with Tracker(tmp_path, backends=["jsonl"], resume=state) as tracker:
        for step in range(4, 6):
            tracker.log({"loss": 100.0 + step}, step)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("step") for r in rows] == [0, 1, 2, 3, None, 4, 5]
    assert [r["loss"] for r in rows if r.get("step", 0) >= 4] == [104.0, 105.0]


def test_a_new_run_in_a_used_folder_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Tracker(tmp_path, backends=["jsonl"]) as tracker:
        tracker.log({"loss": 1.0}, 0)
    assert tracking_records(caplog) == []
    Tracker(tmp_path, backends=["jsonl"]).close()
    (warning,) = tracking_records(caplog)
    assert "already holds metrics from an earlier run" in warning and "resume=" in warning


def test_resume_true_reads_the_state_a_clean_close_left(tmp_path: Path) -> None:
    with Tracker(tmp_path, backends=["jsonl"]) as tracker:
        tracker.log({"loss": 1.0}, 7)
    with Tracker(tmp_path, backends=["jsonl"], resume=True) as tracker:
        assert (
            tracker.last_step == 7
            and tracker.state_dict()["run_id"] == json.loads((tmp_path / "tracking.json").read_text())["run_id"]
        )


def _start_training(*args: object) -> subprocess.Popen[str]:
    script = Path(tracking_targets.__file__)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), "train", *map(str, args)], stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.slow
def test_kill_9_then_resume_logs_every_step_once(tmp_path: Path) -> None:
    require("tensorboard")
    run_dir, state = tmp_path / "run", tmp_path / "checkpoint-state.json"
    proc = _start_training(run_dir, state, 0, 30, 10, 17, 1)  # state kept at steps 0, 10; flushed at 17
    try:
        line = proc.stdout.readline() if proc.stdout else ""  # the test's timeout bounds this wait
        assert line.startswith("FLUSHED 17"), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(18))
    assert json.loads(state.read_text())["step"] == 10
    before = tensorboard_scalars(run_dir)["loss"]
    assert [s for s, _ in before] == list(range(18))  # steps 11..17 are on disk: a resume must not repeat them

    resumed = _start_training(run_dir, state, 11, 25, 10, -1, 2)  # the checkpoint's step + 1 onwards
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "DONE" in out, out
    expected = [(s, float(1000 + s)) for s in range(11)] + [(s, float(2000 + s)) for s in range(11, 26)]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == expected
    assert tensorboard_scalars(run_dir)["loss"] == expected


# ----------------------------------------------------------------------------------------------
# Backends that fail or stall


class SlowStart(Backend):
    name = "slow-start"

    def __init__(self, seconds: float) -> None:
        self.seconds, self.logged = seconds, []

    def start(self, run: Any) -> None:
        time.sleep(self.seconds)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.logged.append(step)


class FailsAt(Backend):
    name = "fails"

    def __init__(self, step: int) -> None:
        self.step, self.logged = step, []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step == self.step:
            raise ConnectionError("the server went away")
        self.logged.append(step)


class Blocks(Backend):
    name = "blocks"

    def __init__(self) -> None:
        self.release = threading.Event()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.release.wait(600)


def test_a_backend_whose_start_stalls_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratlib.tracking")
    slow = SlowStart(3.0)
    with Tracker(tmp_path, backends=["jsonl", slow], start_timeout=0.3, close_timeout=5) as tracker:
        for step in range(20):
            time.sleep(0.05)  # a training step
            tracker.log({"loss": float(step)}, step)
        assert tracker.backends == ["jsonl"]
    warnings = tracking_records(caplog)
    assert len(warnings) == 1, warnings
    assert "'slow-start' is dropped" in warnings[0] and "start_timeout=0.3s" in warnings[0]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(20))
    time.sleep(3.5)  # the start returns late: still no second warning, and nothing logged to it
    assert len(tracking_records(caplog)) == 1 and slow.logged == []


def test_a_backend_whose_log_raises_is_dropped_and_the_others_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailsAt(3)
    with Tracker(tmp_path, backends=["jsonl", failing]) as tracker:
        for step in range(10):
            tracker.log({"loss": float(step)}, step)
        assert tracker.flush(timeout=30)
        assert tracker.backends == ["jsonl"]
    warnings = tracking_records(caplog)
    assert len(warnings) == 1, warnings
    assert "'fails' is dropped: its log (step 3) raised ConnectionError: the server went away" in warnings[0]
    assert failing.logged == [0, 1, 2]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(10))


def test_close_returns_by_its_deadline_when_a_backend_blocks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocks = Blocks()
    tracker = Tracker(tmp_path, backends=["jsonl", blocks], write_timeout=600)
    for step in range(3):
        tracker.log({"loss": float(step)}, step)
    tracker.close(timeout=0.5)  # pytest's timeout fails the test if close waits on the blocked write
    warnings = tracking_records(caplog)
    assert len(warnings) == 1 and "'blocks' is dropped" in warnings[0] and "close deadline" in warnings[0], warnings
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    blocks.release.set()


def test_a_write_that_stalls_past_write_timeout_drops_the_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocks = Blocks()
    with Tracker(tmp_path, backends=["jsonl", blocks], write_timeout=0.2, close_timeout=5) as tracker:
        for step in range(10):
            time.sleep(0.05)
            tracker.log({"loss": float(step)}, step)
        assert tracker.backends == ["jsonl"]
    blocks.release.set()
    warnings = tracking_records(caplog)
    assert len(warnings) == 1 and "write_timeout=0.2s" in warnings[0], warnings


def test_unknown_backend_names_the_closest(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="unknown backend 'tensorbord'.*did you mean 'tensorboard'"):
        Tracker(tmp_path, backends=["jsonl", "tensorbord"])
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_a_missing_package_gives_one_line_with_the_install_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ratlib.tracking import backends

    caplog.set_level(logging.INFO, logger="ratlib.tracking")
    monkeypatch.setattr(backends, "_installed", lambda name: name == "jsonl")
    with Tracker(tmp_path, backends=["jsonl", "tensorboard", "wandb"]) as tracker:
        assert tracker.backends == ["jsonl"]
        tracker.log({"loss": 1.0}, 0)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ratlib.tracking"]
    assert lines == [
        (
            "INFO",
            "tensorboard logging is off: tensorboard is not installed (pip install 'ratlib[tensorboard]'); "
            "the other backends go on",
        ),
        (
            "WARNING",
            "wandb logging is off: wandb is not installed (pip install 'ratlib[wandb]'); the other backends go on",
        ),
    ]


# ----------------------------------------------------------------------------------------------
# What gets logged


def test_values_are_read_on_the_callers_thread_and_helpers_build_scalars(tmp_path: Path) -> None:
    import torch

    from ratlib.memory import MemoryReport, RankMemory

    loss = torch.tensor(2.5)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    gib = 1024**3
    report = MemoryReport(
        [RankMemory(0, "rss", "cpu", gib, 2 * gib, None), RankMemory(1, "rss", "cpu", gib, 3 * gib, None)]
    )
    with Tracker(tmp_path, backends=["jsonl"]) as tracker:
        tracker.log(
            {"loss": loss, "counts": torch.tensor([1, 2]), **lr_metrics(optimizer), **memory_metrics(report)}, 1
        )
        loss.add_(1.0)  # an in-place change after log() must not reach the file
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row == {
        "step": 1,
        "loss": 2.5,
        "counts": [1, 2],
        "lr/group0": 0.1,
        "lr/group1": 0.01,
        "memory/rank0_peak_gib": 2.0,
        "memory/rank0_allocated_gib": 1.0,
        "memory/rank1_peak_gib": 3.0,
        "memory/rank1_allocated_gib": 1.0,
        "memory/max_peak_gib": 3.0,
        "memory/max_rank": 1,
    }
    assert flatten_config({"training": {"lr": 1e-4, "opt": {"name": "adamw"}}, "seed": 0}) == {
        "training.lr": 1e-4,
        "training.opt.name": "adamw",
        "seed": 0,
    }


# ----------------------------------------------------------------------------------------------
# W&B offline and an MLflow file store


def wandb_offline_runs(run_dir: Path) -> dict[str, list[dict[str, float]]]:
    """Run id -> the history rows of every offline W&B run under run_dir (the .wandb files read directly)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs: dict[str, list[dict[str, float]]] = {}
    # In the order they were written, not by path: a resume in the same second as the first segment writes to
    # offline-run-<second>-<id>-1/, whose full path sorts before offline-run-<second>-<id>/ ('-' < '/')
    paths = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    for path in sorted(paths, key=lambda p: Path(p).stat().st_mtime_ns):
        data, pos, pending, rows, run_id = Path(path).read_bytes(), 7, b"", [], None
        while pos + 7 <= len(data):  # a LevelDB-style log: 32 KiB blocks of (crc, length, type) records
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "run":
                    run_id = record.run.run_id
                elif record.WhichOneof("record_type") == "history":
                    rows.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    )
        assert run_id is not None, path
        runs.setdefault(run_id, []).extend(rows)
    return runs


@pytest.mark.slow
def test_wandb_offline_gives_one_run_across_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with Tracker(tmp_path, backends=["wandb"], config={"training": {"lr": 0.1}}, start_timeout=300) as tracker:
        for step in range(5):
            tracker.log({"loss": float(step)}, step)
        assert tracker.flush(timeout=300) and tracker.backends == ["wandb"]
        state = tracker.state_dict()
        tracker.log({"loss": 99.0}, 5)  # after the checkpoint
    run_id = state["backends"]["wandb"]["run_id"]
    with Tracker(tmp_path, backends=["wandb"], resume=state, start_timeout=300) as tracker:
        tracker.log({"loss": 50.0}, 5)
        assert tracker.flush(timeout=300) and tracker.backends == ["wandb"]
    runs = wandb_offline_runs(tmp_path)
    assert list(runs) == [run_id]  # one W&B run id: two offline segments that sync into one run
    steps = [(int(r["step"]), r["loss"]) for r in runs[run_id] if "loss" in r]
    assert steps[:5] == [(s, float(s)) for s in range(5)] and steps[-1] == (5, 50.0)


@pytest.mark.slow
def test_mlflow_file_store_gives_one_run_across_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"training": {"lr": 0.1, "optimizer": "adamw"}}
    with Tracker(tmp_path, backends=["mlflow"], config=config) as tracker:
        for step in range(5):
            tracker.log({"loss": float(step)}, step)
        assert tracker.flush(timeout=120) and tracker.backends == ["mlflow"]
        state = tracker.state_dict()
    with Tracker(tmp_path, backends=["mlflow"], resume=state) as tracker:
        tracker.log({"loss": 50.0}, 5)
        assert tracker.flush(timeout=120) and tracker.backends == ["mlflow"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert [r.info.run_id for r in runs] == [state["backends"]["mlflow"]["run_id"]]
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.params == {"training.lr": "0.1", "training.optimizer": "adamw"}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(5)] + [(5, 50.0)]


def test_a_script_that_forgets_close_still_writes_every_row(tmp_path: Path) -> None:
    code = (
        "import sys; from ratlib.tracking import Tracker\n"
        "t = Tracker(sys.argv[1], backends=['jsonl'])\n"
        "for s in range(200): t.log({'loss': float(s)}, s)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(200))


def test_write_outcome_is_atomic_plain_json_from_the_main_rank_only(tmp_path: Path, monkeypatch) -> None:
    from ratlib.tracking import TrackingError, read_outcome, write_outcome

    assert read_outcome(tmp_path) is None
    path = write_outcome(tmp_path, "stopped", step=7, progressed=True)
    assert path == tmp_path / "outcome.json" and read_outcome(tmp_path)["step"] == 7
    write_outcome(tmp_path, "finished", metrics={"dice": 0.5, "n": 3})
    assert read_outcome(tmp_path)["status"] == "finished" and read_outcome(tmp_path)["metrics"] == {"dice": 0.5, "n": 3}
    with pytest.raises(TrackingError, match="unknown status"):
        write_outcome(tmp_path, "crashed")
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert write_outcome(tmp_path / "other", "finished") is None and not (tmp_path / "other").exists()


def test_jsonl_writes_each_line_at_once_and_fsyncs_at_flush_close_and_every_fsync_secs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line is written (visible to a reader, safe from a crash of the process) as soon as the backend takes it;
    fsync (safe from a crash of the machine) comes at flush, at close and at most fsync_secs apart, not per line."""
    from ratlib.tracking import backends

    synced: list[int] = []  # the inode of each file fsynced (tracking.json's atomic writes fsync too)
    real_fsync = os.fsync
    monkeypatch.setattr(backends.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])

    def metrics_syncs(run: Path) -> int:
        return synced.count((run / "metrics.jsonl").stat().st_ino)

    tracker = Tracker(tmp_path, backends=["jsonl"], jsonl={"fsync_secs": 3600})
    for step in range(50):
        tracker.log({"loss": float(step)}, step)
    assert tracker.flush(timeout=30)
    assert metrics_syncs(tmp_path) == 1  # the flush, not one per line
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(50))
    tracker.log({"loss": 50.0}, 50)
    tracker.close()
    assert metrics_syncs(tmp_path) == 2  # close
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1] == {"step": 50, "loss": 50.0}

    with Tracker(tmp_path / "often", backends=["jsonl"], jsonl={"fsync_secs": 0}) as often:
        for step in range(5):
            often.log({"loss": 1.0}, step)
        assert often.flush(timeout=30)
    assert metrics_syncs(tmp_path / "often") == 5  # fsync_secs=0: after every line, as before

"""ratlib.checkpoint's sharded checkpoints (folders through torch.distributed.checkpoint): round trips, the commit
protocol and latest(), loading at other world sizes into FSDP2 and plain models, safe metadata, bad input,
asynchronous saves (staging, errors, memory), consolidation, and crash trials on real ranks."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ratlib import checkpoint
from ratlib.checkpoint import CheckpointError, sharded
from ratlib.checkpoint.safe_metadata import read_metadata
from ratlib.io import TMP_PREFIX

HERE = Path(__file__).resolve().parent
ENV = {"CUDA_VISIBLE_DEVICES": ""}

pytestmark = pytest.mark.needs_torch("2.6", "sharded checkpoints: torch.distributed.checkpoint and DTensor as of 2.6")


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "cfg": {"lr": 0.1}}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_a_folder_path_round_trips_any_state_and_commits(tmp_path: Path) -> None:
    state = _state()
    path = checkpoint.save(state, tmp_path / "step1", per_rank={"batch": [1, 2]})
    assert path == tmp_path / "step1" and checkpoint.is_committed(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1"]  # no temporary left
    assert {"COMMITTED", ".metadata", "plain.pt", "rank0.pt"} <= {p.name for p in path.iterdir()}
    loaded = checkpoint.load(path)
    assert _same({k: v for k, v in loaded.items() if k != "per_rank"}, {**state, "optimizer": loaded["optimizer"]})
    assert _same(loaded["optimizer"]["state"], state["optimizer"]["state"])
    assert loaded["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert checkpoint.rank_entry(loaded) == {"batch": [1, 2]}
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model.load_state_dict(loaded["model"])
    into = model.state_dict()  # in place, into plain tensors
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    checkpoint.load(path, into={"model": into})
    assert _same(model.state_dict(), state["model"])


def test_latest_sees_committed_folders_and_files_never_uncommitted_ones(tmp_path: Path) -> None:
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "step2")
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "step10.pt")
    assert checkpoint.latest(tmp_path) == tmp_path / "step10.pt"
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "step11")
    assert checkpoint.latest(tmp_path) == tmp_path / "step11"
    assert checkpoint.latest(tmp_path, "*.pt") == tmp_path / "step10.pt"
    # a save killed before its commit: a temporary folder, or a folder with its files but no marker
    (tmp_path / f"{TMP_PREFIX}step12.abc").mkdir()
    (tmp_path / f"{TMP_PREFIX}step12.abc" / ".metadata").write_bytes(b"x")
    (tmp_path / "step13").mkdir()
    (tmp_path / "step13" / ".metadata").write_bytes(b"x")
    assert checkpoint.latest(tmp_path) == tmp_path / "step11"
    for bad in (tmp_path / "step13", tmp_path / f"{TMP_PREFIX}step12.abc"):
        with pytest.raises(CheckpointError, match="not a committed checkpoint.*latest"):
            checkpoint.load(bad)


def test_keep_prunes_committed_checkpoints_only_and_cleans_leftovers(tmp_path: Path) -> None:
    leftover = tmp_path / f"{TMP_PREFIX}step0.dead"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / "step9.pt").write_bytes(b"a file of the same pattern is not a folder checkpoint")
    for step in range(1, 6):
        checkpoint.save({"w": torch.full((2,), float(step))}, tmp_path / f"step{step}", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step4", "step5", "step9.pt"]
    assert checkpoint.load(tmp_path / "step5")["w"].tolist() == [5.0, 5.0]
    checkpoint.save({"w": torch.zeros(1)}, tmp_path / "last")  # a fixed name is replaced, never pruned
    checkpoint.save({"w": torch.ones(1)}, tmp_path / "last", keep=1)
    assert checkpoint.load(tmp_path / "last")["w"].tolist() == [1.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_pt_path_with_dtensors_is_refused_naming_the_folder_fix(tmp_path: Path) -> None:
    class DTensor(torch.Tensor):  # matched by class name, as in files.sharded_keys
        pass

    state = {"model": {"w": torch.zeros(2).as_subclass(DTensor)}}
    with pytest.raises(CheckpointError, match="model.w.*use a folder path.*'.*ck'.*gather a full state dict"):
        checkpoint.save(state, tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="async_save=True.*folder path"):
        checkpoint.save({"w": torch.zeros(1)}, tmp_path / "ck.pt", async_save=True)


def test_bad_input_gets_errors_naming_input_expectation_and_fix(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"not a checkpoint.*a\.pt.*Expected: a folder written by"):
        checkpoint.load(tmp_path / "notes")
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="does not exist.*no committed"):
        checkpoint.load(tmp_path / "nothing")
    path = checkpoint.save(_state(), tmp_path / "ck")
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))  # 2.weight, not 1.
    with pytest.raises(CheckpointError, match="another model") as info:
        checkpoint.load(path, into={"model": other.state_dict()})
    text = str(info.value)
    assert "missing from the checkpoint: model.2.weight (closest: model.1.weight)" in text, text
    assert "in the checkpoint but not in the target: model.1.bias (closest: model.2.bias)" in text, text
    assert "model.1.weight (closest: model.2.weight)" in text and "strict=False" in text, text
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"other shapes.*model.0.weight: \(8, 4\) saved, \(16, 4\) in the target"):
        checkpoint.load(path, into={"model": wider.state_dict()})
    partial = checkpoint.load(path, into={"model": other.state_dict()}, strict=False)
    assert set(partial["model"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    with pytest.raises(CheckpointError, match="not a ratlib checkpoint.*not replaced"):
        checkpoint.save({"w": torch.zeros(1)}, tmp_path / "notes")
    with pytest.raises(CheckpointError, match="weights_only=True.*nothing was written"):
        checkpoint.save({"w": torch.zeros(1), "odd": Path("x")}, tmp_path / "odd")
    assert not (tmp_path / "odd").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RATLIB_TEST_MARKER']}",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_loading_a_crafted_metadata_runs_no_code(tmp_path: Path, monkeypatch) -> None:
    path = checkpoint.save({"w": torch.ones(3)}, tmp_path / "ck")
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("RATLIB_TEST_MARKER", str(marker))
    (path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match=r"names posix\.system.*could run code"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=r"posix\.system"):
        sharded.consolidate(path, tmp_path / "out.pt")
    assert not marker.exists()
    # the same file through plain DCP runs the command: what the safe reader prevents
    import torch.distributed.checkpoint as dcp

    with pytest.raises(BaseException):  # noqa: B017 - DCP's CheckpointException, after the command has run
        dcp.load({"w": torch.zeros(3)}, checkpoint_id=path, no_dist=True)
    assert marker.exists()


def test_consolidate_writes_one_full_file_that_loads_weights_only(tmp_path: Path) -> None:
    state = _state()
    checkpoint.save(state, tmp_path / "ck")
    done = subprocess.run(
        [sys.executable, "-m", "ratlib.checkpoint", "consolidate", str(tmp_path / "ck"), str(tmp_path / "full.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ENV},
    )
    assert done.returncode == 0, done.stderr
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert _same(full["model"], state["model"]) and full["epoch"] == 3
    bad = subprocess.run(
        [sys.executable, "-m", "ratlib.checkpoint", "consolidate", str(tmp_path / "nope"), str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_an_async_save_writes_the_values_at_call_time(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_avg = optimizer.state[model[0].weight]["exp_avg"].clone()
    checkpoint.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, tmp_path / "a1", async_save=True)
    with torch.no_grad():  # right after the call: every parameter and the optimizer state
        for p in model.parameters():
            p.add_(1.0)
        optimizer.state[model[0].weight]["exp_avg"].add_(1.0)
    checkpoint.wait_pending()
    loaded = checkpoint.load(tmp_path / "a1")
    assert _same(loaded["model"], want) and torch.equal(loaded["opt"]["state"][0]["exp_avg"], want_avg)
    assert checkpoint.save_in_flight() is None


def test_an_error_in_the_background_write_is_raised_at_the_next_call(tmp_path: Path, monkeypatch) -> None:
    def fail(phase: str, path: Path) -> None:
        if phase == "marker":
            raise OSError("disk full (injected)")

    checkpoint.save({"w": torch.ones(1)}, tmp_path / "step1")
    monkeypatch.setattr(sharded, "_phase_hook", fail)
    checkpoint.save({"w": torch.ones(1)}, tmp_path / "step2", async_save=True)  # returns: the write is behind
    with pytest.raises(CheckpointError, match="asynchronous.*could not commit.*disk full"):
        checkpoint.latest(tmp_path)
    monkeypatch.setattr(sharded, "_phase_hook", None)
    assert checkpoint.latest(tmp_path) == tmp_path / "step1"  # raised once, and nothing half-done is visible
    checkpoint.save({"w": torch.ones(1)}, tmp_path / "step3", async_save=True)
    assert checkpoint.load(tmp_path / "step3")["w"].tolist() == [1.0]  # load waits for the save in flight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_async_save_of_cuda_tensors_stages_them_in_pinned_memory(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256).cuda()
    want = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    checkpoint.save({"model": model.state_dict()}, tmp_path / "gpu1", async_save=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # on the GPU, right after the call
    checkpoint.wait_pending()
    assert _same(checkpoint.load(tmp_path / "gpu1")["model"], want)
    into = {"model": model.state_dict()}  # back into the CUDA tensors, in place
    checkpoint.load(tmp_path / "gpu1", into=into)
    assert _same({k: v.cpu() for k, v in model.state_dict().items()}, want)


RSS = """
import os, sys, torch
from ratlib import checkpoint
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
state = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}   # 32 MB
folder = sys.argv[1]
checkpoint.save(state, os.path.join(folder, "s0"), async_save=True, keep=1)
checkpoint.wait_pending()
one = rss()
for i in range(1, 51):
    checkpoint.save(state, os.path.join(folder, f"s{i}"), async_save=True, keep=1)
checkpoint.wait_pending()
print(f"RSS {one:.0f} {rss():.0f}")
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_fifty_async_saves_leave_the_memory_of_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RSS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ENV},
    )
    assert done.returncode == 0, done.stderr
    one, fifty = (float(x) for x in done.stdout.split("RSS ")[1].split())
    assert fifty <= one * 1.5, (one, fifty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s50"]


def _save_then_load(tmp_path: Path, run_on_ranks, saved_on: int, loaded_on: int) -> None:
    from checkpoint_sharded_targets import fsdp2_save, load_everywhere, plain_model, same

    run_on_ranks(fsdp2_save, saved_on, args=(str(tmp_path),), env=ENV, timeout=240).check()
    assert checkpoint.latest(tmp_path, "step*") == tmp_path / "step2"
    stored = read_metadata(tmp_path / "step1").state_dict_metadata
    assert len(stored["model.0.weight"].chunks) == 8  # its 8 rows in pieces of one row (planner.PIECE_BYTES)
    # one process, no group: full plain tensors, and into a plain model
    want1 = torch.load(tmp_path / "expected1.pt", weights_only=True)
    state = checkpoint.load(tmp_path / "step1")
    same(want1, {"model": state["model"], "optimizer": state["optimizer"]})
    assert state["epoch"] == 3 and state["cfg"] == {"lr": 0.1}
    assert [e["rank"] for e in state["per_rank"]["entries"]] == list(range(saved_on))
    model = plain_model(3)
    model.load_state_dict(checkpoint.load(tmp_path / "step2", into={"model": model.state_dict()})["model"])
    same(torch.load(tmp_path / "expected2.pt", weights_only=True)["model"], model.state_dict())
    assert sharded.consolidate(tmp_path / "step2", tmp_path / "full.pt") == tmp_path / "full.pt"
    args = (str(tmp_path), "step2", "expected2.pt")
    run = run_on_ranks(load_everywhere, loaded_on, args=args, env=ENV, timeout=240).check()
    for rank in range(loaded_on):
        assert f"rank {rank} loaded step2 at world size {loaded_on}" in run.outputs[rank], str(run)
        assert f"rank {rank} ddp round trip ok" in run.outputs[rank], str(run)


@pytest.mark.distributed
def test_fsdp2_saved_on_2_ranks_loads_on_3_and_on_1_into_fsdp2_and_plain_models(tmp_path: Path, run_on_ranks) -> None:
    """2 -> 3 ranks (uneven shards) and 2 -> 1 process with no group; a DDP checkpoint into FSDP2 and back; the
    async save holds the values at its call; a consolidated .pt into FSDP2."""
    _save_then_load(tmp_path, run_on_ranks, 2, 3)


@pytest.mark.distributed
@pytest.mark.slow  # two launches of 4 and 2 ranks
def test_fsdp2_saved_on_4_ranks_loads_on_2(tmp_path: Path, run_on_ranks) -> None:
    _save_then_load(tmp_path, run_on_ranks, 4, 2)


@pytest.mark.distributed
def test_a_background_write_failing_on_one_rank_is_raised_on_every_rank(tmp_path: Path, run_on_ranks) -> None:
    from checkpoint_sharded_targets import async_error_on_one_rank

    run = run_on_ranks(async_error_on_one_rank, 2, args=(str(tmp_path),), env=ENV, timeout=180).check()
    for rank in (0, 1):
        text = run.outputs[rank]
        assert f"rank {rank} raised: the asynchronous checkpoint.save(" in text, str(run)
        assert "the write failed on rank(s) [1]" in text and "No space left on device (injected)" in text, text
        assert f"rank {rank} recovered" in text, str(run)


EXIT = """
import sys, torch
from ratlib import checkpoint
checkpoint.save({"w": torch.ones(256, 1024)}, sys.argv[1], async_save=True)
"""


def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, "-c", EXIT, str(tmp_path / "ck")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert checkpoint.is_committed(tmp_path / "ck") and checkpoint.load(tmp_path / "ck")["w"].shape == (256, 1024)


CRASH = HERE / "checkpoint_sharded_targets.py"


def _crash_trials(tmp_path: Path, trials: int, seed: int, worlds: str) -> None:
    done = subprocess.run(
        [sys.executable, str(CRASH), str(tmp_path), str(trials), str(seed), worlds],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and "ALL OK" in done.stdout, done.stdout[-6000:] + done.stderr[-3000:]
    assert len(lines) == trials


@pytest.mark.distributed
def test_sigkill_at_any_phase_on_one_or_all_ranks_leaves_a_complete_latest(tmp_path: Path) -> None:
    _crash_trials(tmp_path, 32, seed=1, worlds="2,3")


@pytest.mark.distributed
@pytest.mark.slow
def test_sigkill_crash_trials_many_more_on_2_to_4_ranks(tmp_path: Path) -> None:
    _crash_trials(tmp_path, 120, seed=2, worlds="2,3,4")


@pytest.mark.distributed
def test_preemption_exit_and_shutdown_wait_for_the_async_save_in_flight(tmp_path: Path, run_on_ranks) -> None:
    from checkpoint_sharded_targets import async_save_then_preempt_exit

    result = run_on_ranks(async_save_then_preempt_exit, 2, args=(str(tmp_path),), timeout=120)
    assert result.returncodes == [75, 75], str(result)
    assert checkpoint.is_committed(tmp_path / "ck")
    assert checkpoint.load(tmp_path / "ck")["step"] == 3


@pytest.mark.distributed
def test_a_state_saved_on_2_ranks_loads_on_more_ranks_than_a_tensor_has_rows(tmp_path: Path, run_on_ranks) -> None:
    from checkpoint_sharded_targets import more_ranks_than_rows

    run_on_ranks(more_ranks_than_rows, 2, args=(str(tmp_path), "save"), timeout=120).check()
    run_on_ranks(more_ranks_than_rows, 4, args=(str(tmp_path), "load"), timeout=180).check()

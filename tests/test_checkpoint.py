"""ratlib.checkpoint: atomic main-rank saves that survive a kill mid-save, all-rank loads, latest()."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ratlib import checkpoint
from ratlib.checkpoint import CheckpointError


def test_save_load_round_trip_creates_folder_and_leaves_no_temp(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = checkpoint.save({"model": model.state_dict(), "epoch": 3, "config": {"lr": 1e-4}}, tmp_path / "a" / "b.pt")
    assert path == tmp_path / "a" / "b.pt"
    state = checkpoint.load(path)
    assert state["epoch"] == 3 and state["config"] == {"lr": 1e-4}
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.pt"]


def test_failure_before_rename_keeps_the_previous_file_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    def boom(tmp: Path) -> None:
        assert tmp.parent == tmp_path and tmp.name.startswith(checkpoint.TMP_PREFIX) and tmp.stat().st_size > 0
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint, "_before_rename", boom)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


KILL_MID_SAVE = textwrap.dedent("""
    import os, sys
    from ratlib import checkpoint
    folder = sys.argv[1]
    checkpoint.save({"step": 10}, os.path.join(folder, "step10.pt"))
    checkpoint.save({"step": 10}, os.path.join(folder, "last.pt"))
    checkpoint._before_rename = lambda tmp: os._exit(9)   # the process dies between write and rename
    checkpoint.save({"step": 20}, os.path.join(folder, "last.pt"))
""")


def test_process_killed_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]
    assert len(leftovers) == 1  # the half-finished save is there, but never taken for a checkpoint
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 10
    assert checkpoint.latest(tmp_path) == tmp_path / "step10.pt"


def test_latest_orders_by_numbers_and_ignores_temporaries(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path / "missing") is None
    assert checkpoint.latest(tmp_path) is None
    for name in ["epoch9.pt", "epoch10.pt", "epoch2.pt", f"{checkpoint.TMP_PREFIX}epoch11.pt.x", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint.latest(tmp_path) == tmp_path / "epoch10.pt"
    assert checkpoint.latest(tmp_path, "*.txt") == tmp_path / "notes.txt"


def test_keep_rotates_numbered_checkpoints(tmp_path: Path) -> None:
    for epoch in range(1, 6):
        checkpoint.save({"epoch": epoch}, tmp_path / f"epoch{epoch}.pt", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch4.pt", "epoch5.pt"]
    with pytest.raises(ValueError, match="keep=0"):
        checkpoint.save({}, tmp_path / "epoch6.pt", keep=0)


def test_load_errors_list_what_exists(tmp_path: Path) -> None:
    checkpoint.save({"epoch": 1}, tmp_path / "epoch1.pt")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tmp_path / "epoch2.pt")
    text = str(info.value)
    assert "epoch2.pt does not exist" in text and "epoch1.pt" in text and "latest" in text
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "epoch3.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read.*load an earlier one"):
        checkpoint.load(tmp_path / "epoch3.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        checkpoint.load(tmp_path / "list.pt")


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_reproduces_draws() -> None:
    state = checkpoint.rng_state()
    assert state["world_size"] == 1 and set(state["ranks"][0]) >= {"python", "numpy", "torch"}
    first = _draws()
    checkpoint.set_rng_state(state)
    assert _draws() == first
    with pytest.raises(ValueError, match="rng_state"):
        checkpoint.set_rng_state({"ranks": []})


def test_unwrap_model_removes_compile_wrapper() -> None:
    model = torch.nn.Linear(2, 2)
    assert checkpoint.unwrap_model(model) is model
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert checkpoint.unwrap_model(compiled) is model
    assert set(checkpoint.unwrap_model(compiled).state_dict()) == {"weight", "bias"}


def two_rank_checkpoint(folder: str) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ratlib import distributed

    with distributed(device="cpu") as info:
        torch.manual_seed(100 + info.rank)  # different streams per rank, as with per-rank seeds
        model = DDP(torch.nn.Linear(2, 2))
        saved_rng = checkpoint.rng_state()  # a collective: every rank's generators
        expected = torch.rand(2).tolist()
        # Every rank calls save; only rank 0 writes (its own rank in the file proves it), all wait.
        path = checkpoint.save(
            {"writer": info.rank, "rng": saved_rng, "model": checkpoint.unwrap_model(model).state_dict()},
            Path(folder) / "epoch1.pt",
        )
        state = checkpoint.load(path)  # on every rank, right after the barrier
        assert state["writer"] == 0 and set(state["model"]) == {"weight", "bias"}, state["writer"]
        assert state["rng"]["world_size"] == 2
        checkpoint.set_rng_state(state["rng"])
        assert torch.rand(2).tolist() == expected  # this rank's own stream, not rank 0's
        dist.barrier()
        print(f"rank {info.rank} ok", flush=True)
    return 0


@pytest.mark.distributed
def test_two_ranks_rank_zero_writes_everyone_loads_own_rng(tmp_path: Path, run_on_ranks) -> None:
    run = run_on_ranks(two_rank_checkpoint, 2, args=(str(tmp_path),), env={"CUDA_VISIBLE_DEVICES": ""}).check()
    assert "rank 0 ok" in run.outputs[0] and "rank 1 ok" in run.outputs[1]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch1.pt"]

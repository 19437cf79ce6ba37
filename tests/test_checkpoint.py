"""ratlib.checkpoint: atomic main-rank saves that survive a kill mid-save, all-rank loads, latest()."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ratlib import checkpoint
from ratlib.checkpoint import CheckpointError, CheckpointNotFoundError
from ratlib.errors import RatlibError


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
        assert tmp.parent == tmp_path and tmp.name.startswith(checkpoint.files.TMP_PREFIX) and tmp.stat().st_size > 0
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint.files, "_before_rename", boom)
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
    checkpoint.files._before_rename = lambda tmp: os._exit(9)   # the process dies between write and rename
    checkpoint.save({"step": 20}, os.path.join(folder, "last.pt"))
""")


def test_process_killed_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(checkpoint.files.TMP_PREFIX)]
    assert len(leftovers) == 1  # the half-finished save is there, but never taken for a checkpoint
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 10
    assert checkpoint.latest(tmp_path) == tmp_path / "step10.pt"


def test_latest_orders_by_numbers_and_ignores_temporaries(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path / "missing") is None
    assert checkpoint.latest(tmp_path) is None
    for name in ["epoch9.pt", "epoch10.pt", "epoch2.pt", f"{checkpoint.files.TMP_PREFIX}epoch11.pt.x", "notes.txt"]:
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
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointNotFoundError)
    assert isinstance(info.value, RatlibError)
    (tmp_path / "epoch3.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read.*load an earlier one"):
        checkpoint.load(tmp_path / "epoch3.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        checkpoint.load(tmp_path / "list.pt")


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_reproduces_draws(tmp_path: Path) -> None:
    np.random.randn()  # leaves a cached Gaussian in NumPy's state (has_gauss=1), which must come back too
    state = checkpoint.rng_state()
    assert state["world_size"] == 1 and set(state["ranks"][0]) >= {"python", "numpy", "torch"}
    assert state["ranks"][0]["numpy"]["has_gauss"] == 1
    first = _draws() + (float(np.random.randn()),)
    checkpoint.save({"rng": state}, tmp_path / "rng.pt")
    # Plain data all the way down: torch's safe unpickler takes it without any allowlist.
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    checkpoint.set_rng_state(loaded)
    assert _draws() + (float(np.random.randn()),) == first
    with pytest.raises(ValueError, match="rng_state"):
        checkpoint.set_rng_state({"ranks": []})


class _RunsCode:
    """A pickle payload with a side effect, as in a checkpoint from an untrusted source."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_load_refuses_a_pickle_that_runs_code_and_names_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "shared.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert not marker.exists(), "load() ran code from the file"
    text = str(info.value)
    assert str(path) in text and "system" in text and "weights_only=False" in text, text
    assert isinstance(info.value, RatlibError) and not isinstance(info.value, FileNotFoundError)
    # The opt-in still works for a file the user trusts, and says what it does in a warning naming the file.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("ratlib.checkpoint").addHandler(handler)
    try:
        checkpoint.load(path, weights_only=False)
    finally:
        logging.getLogger("ratlib.checkpoint").removeHandler(handler)
    assert marker.exists()
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in records), records


def test_old_checkpoint_with_numpy_state_gets_the_upgrade_command(tmp_path: Path) -> None:
    path = tmp_path / "epoch0003.pt"
    np.random.seed(7)
    legacy_rng = {"world_size": 1, "ranks": [{**checkpoint.rng_state()["ranks"][0], "numpy": np.random.get_state()}]}
    expected = float(np.random.rand())
    torch.save({"epoch": 3, "rng": legacy_rng}, path)  # what ratlib wrote before the plain form
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    text = str(info.value)
    assert f"python -m ratlib.checkpoint upgrade {path}" in text and "weights_only=False" in text, text
    assert "numpy" in text
    proc = subprocess.run(
        [sys.executable, "-m", "ratlib.checkpoint", "upgrade", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 3
    checkpoint.set_rng_state(state["rng"])
    assert float(np.random.rand()) == expected


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, steps: range) -> None:
    """A few steps whose data come from all three generators, so a missed RNG state changes the weights."""
    for _ in steps:
        x = torch.randn(4, 3) + float(np.random.rand()) + random.random()
        loss = torch.nn.functional.dropout(model(x), 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]


def _fresh(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def test_resume_from_a_safe_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    model, opt, sched = _fresh(0)
    _train(model, opt, sched, range(3))
    path = checkpoint.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),  # type: ignore[attr-defined]
            "step": 3,
            "rng": checkpoint.rng_state(),
            "config": {"lr": 0.05, "name": "toy", "layers": [3, 2]},
        },
        tmp_path / "step3.pt",
    )
    _train(model, opt, sched, range(3, 7))
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(99)  # the resumed process starts with other generators and fresh objects
    np.random.seed(99)
    resumed, opt2, sched2 = _fresh(123)
    state = checkpoint.load(path)  # weights_only=True
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])  # type: ignore[attr-defined]
    checkpoint.set_rng_state(state["rng"])
    _train(resumed, opt2, sched2, range(state["step"], 7))
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


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


def save_on_main_only(folder: str) -> int:
    """The misuse: save inside ``if info.is_main:``; the main rank must get a message naming it."""
    from ratlib import distributed

    with distributed(device="cpu", timeout=60) as info:
        if info.is_main:
            checkpoint.save({"step": 1}, Path(folder) / "step1.pt")
    return 0


@pytest.mark.distributed
def test_save_on_the_main_rank_only_says_every_rank_must_call_it(tmp_path: Path, run_on_ranks) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "", "RATLIB_SYNC_TIMEOUT": "5"}
    run = run_on_ranks(save_on_main_only, 2, args=(str(tmp_path),), env=env, timeout=120)
    assert run.returncodes[0] != 0 and not run.timed_out, str(run)
    assert "CheckpointError" in run.stderrs[0] and "every rank must call save" in run.stderrs[0], str(run)
    assert "sync=False" in run.stderrs[0] and not list(tmp_path.iterdir()), str(run)


def main_only_block_while_the_peer_trains(folder: str, what: str) -> int:
    """A flat loop's misuse: rank 0 saves (or takes rng_state) inside ``if is_main:`` while rank 1 is already in
    the next step's DDP backward, waiting in its gradient all-reduce for rank 0."""
    import time

    from torch.nn.parallel import DistributedDataParallel as DDP

    from ratlib import distributed

    with distributed(device="cpu", timeout=600) as info:  # a group timeout no test waits for
        model = DDP(torch.nn.Linear(4, 1))
        for step in range(3):
            model(torch.randn(8, 4)).sum().backward()
            if step == 1 and info.is_main:
                began = time.monotonic()
                try:
                    if what == "save":
                        checkpoint.save({"model": model.module.state_dict()}, Path(folder) / "ck.pt")
                    else:
                        checkpoint.rng_state()
                except checkpoint.CheckpointError as exc:
                    print(f"raised after {time.monotonic() - began:.1f} s: {exc}", flush=True)
                    return 3
    return 0


@pytest.mark.distributed
@pytest.mark.parametrize("what", ["save", "rng_state"])
def test_a_checkpoint_call_inside_a_main_only_block_fails_fast_while_the_peer_is_in_a_backward(
    tmp_path: Path, run_on_ranks, what: str
) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "", "RATLIB_SYNC_TIMEOUT": "5"}
    run = run_on_ranks(main_only_block_while_the_peer_trains, 2, args=(str(tmp_path), what), env=env, timeout=120)
    assert not run.timed_out and run.returncodes[0] == 3, str(run)  # not the group's 10 minutes
    out = run.stdouts[0]
    assert f"checkpoint.{what}(" in out and "rank(s) [1] of 2 did not reach it within 5 s" in out, out
    assert float(out.split("raised after ")[1].split(" s")[0]) < 30, out
    assert run.returncodes[1] != 0  # its all-reduce failed once rank 0 was gone: nothing hangs
    assert not list(tmp_path.iterdir())  # nothing written


def fsdp2_save_is_refused_and_the_full_state_round_trips(folder: str) -> int:
    """The data loss of issue 29: an FSDP2 model's state_dict() saved with checkpoint.save. It must be refused
    on every rank (naming the keys), and the fix the message gives must restore the same weights."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ratlib import distributed

    def sharded_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    with distributed(device="cpu", timeout=60) as info:
        model = sharded_model(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        path = Path(folder) / "ck.pt"
        try:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, path)
        except checkpoint.CheckpointError as exc:
            text = str(exc)
            assert "sharded" in text and "0.weight" in text and "get_state_dict" in text, text
            print(f"rank {info.rank} refused", flush=True)
        else:
            raise AssertionError("a DTensor state was saved")
        assert not path.exists() and not list(Path(folder).iterdir()), list(Path(folder).iterdir())
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, _ = get_state_dict(model, optimizer, options=opts)
        checkpoint.save({"model": model_state}, path)  # full tensors on the main rank, {} elsewhere
        fresh = sharded_model(1)  # other weights
        state = checkpoint.load(path)
        set_model_state_dict(
            fresh,
            state["model"] if info.is_main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
            assert torch.equal(a.full_tensor(), b.full_tensor()), name
        print(f"rank {info.rank} restored", flush=True)
    return 0


@pytest.mark.distributed
@pytest.mark.needs_torch("2.6", "FSDP2: torch.distributed.fsdp.fully_shard")
def test_an_fsdp2_state_is_refused_on_every_rank_and_the_fix_restores_it(tmp_path: Path, run_on_ranks) -> None:
    run = run_on_ranks(
        fsdp2_save_is_refused_and_the_full_state_round_trips,
        2,
        args=(str(tmp_path),),
        env={"CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    ).check()
    for rank in (0, 1):
        assert f"rank {rank} refused" in run.outputs[rank] and f"rank {rank} restored" in run.outputs[rank], str(run)


def test_sharded_keys_finds_nested_dtensors_only() -> None:
    class DTensor(torch.Tensor):  # the check goes by class name, so a stand-in shows the walk
        pass

    shard = torch.zeros(2).as_subclass(DTensor)
    state = {"model": {"w": shard, "b": torch.zeros(1)}, "optim": {"state": {0: {"exp_avg": shard}}}, "ep": 3}
    assert checkpoint.sharded_keys(state) == ["model.w", "optim.state.0.exp_avg"]
    assert checkpoint.sharded_keys({"x": [torch.zeros(1), (1, "a")]}) == []


FLAT_LOOP = Path(__file__).with_name("flat_loop_train.py")


@pytest.mark.distributed
@pytest.mark.slow  # three 2-rank launches
def test_a_flat_script_with_a_main_only_evaluation_resumes_bit_identically(tmp_path: Path, run_on_ranks) -> None:
    """Each rank's prefetched batch rides in the checkpoint as its per-rank entry, and each rank's RNG is taken
    before the main rank's evaluation draws: stopped after iteration 8's checkpoint and resumed, the run ends
    with the weights of an uninterrupted one, every tensor bit for bit."""
    env = {"CUDA_VISIBLE_DEVICES": ""}
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_on_ranks(FLAT_LOOP, 2, args=[str(whole)], env=env, timeout=120).check()
    run_on_ranks(FLAT_LOOP, 2, args=[str(split), "--stop-after", "8"], env=env, timeout=120).check()
    assert not (split / "final.pt").exists() and (split / "ckpt0008.pt").is_file()
    entries = checkpoint.load(split / "ckpt0008.pt")["per_rank"]
    assert entries["world_size"] == 2 and not torch.equal(
        entries["entries"][0]["batch"][0], entries["entries"][1]["batch"][0]
    )
    run_on_ranks(FLAT_LOOP, 2, args=[str(split), "--resume"], env=env, timeout=120).check()
    a = torch.load(whole / "final.pt", weights_only=True)
    b = torch.load(split / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resume is not exact"


def test_rank_entry_needs_per_rank_entries_of_this_world_size(tmp_path: Path) -> None:
    path = checkpoint.save({"step": 1}, tmp_path / "a.pt", per_rank={"batch": [1, 2]})  # one process
    state = checkpoint.load(path)
    assert checkpoint.rank_entry(state) == {"batch": [1, 2]} and state["per_rank"]["world_size"] == 1
    other = {**state, "per_rank": {"world_size": 2, "entries": [{"b": 0}, {"b": 1}]}}
    with pytest.raises(checkpoint.CheckpointError, match="from 2 rank.s., this job has 1"):
        checkpoint.rank_entry(other)
    assert checkpoint.rank_entry(other, strict=False) is None
    with pytest.raises(checkpoint.CheckpointError, match="no per-rank entries"):
        checkpoint.rank_entry({"step": 1})
    with pytest.raises(checkpoint.CheckpointArgumentError, match="already has a 'per_rank' key"):
        checkpoint.save({"per_rank": 1}, tmp_path / "b.pt", per_rank={})

"""Paths that had no test (issue #24, item 7), each with an assertion a wrong implementation fails.

check_config's five lesser findings, set_rng_state across a world-size change, adopting a process group
made by another framework, main_process_first when the main rank raises, reduce_dict with keys in other
orders, memory_report(reset=True), checkpoint.save(sync=False), ``ratlib doctor --gpu-memory`` and the
hang watchdog when the store's host is gone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ratlib import checkpoint
from ratlib.config_defaults import check_config, load_config
from ratlib.testing import free_port, run_on_ranks

# ----------------------------------------------------------------------------------------------
# check_config: compile on CPU, DeepSpeed missing, offload at stage 0, warmup >= epochs, num_workers


def _keys(findings) -> set[tuple[str, str]]:
    return {(f.severity, f.key) for f in findings}


def test_check_config_notes_compile_on_cpu_only() -> None:
    cfg = load_config({"training": {"compile": True, "mixed_precision": False}})
    assert ("info", "training.compile") in _keys(check_config(cfg, device="cpu"))
    assert "training.compile" not in {f.key for f in check_config(cfg, device="cuda", device_memory_gib=80)}
    plain = load_config({"training": {"compile": False, "mixed_precision": False}})
    assert "training.compile" not in {f.key for f in check_config(plain, device="cpu")}


def test_check_config_flags_deepspeed_enabled_but_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config({"training": {"deepspeed": {"enabled": True, "zero_stage": 2}}})
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed, whether or not it is
    (finding,) = [f for f in check_config(cfg, device="cuda", device_memory_gib=80) if f.key.startswith("training.d")]
    assert (finding.severity, finding.key) == ("error", "training.deepspeed.enabled")
    assert finding.message == "DeepSpeed is enabled but not installed" and "pip install 'ratlib[deepspeed]'" in (
        finding.advice
    )
    monkeypatch.delitem(sys.modules, "deepspeed")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a)
    )
    assert ("error", "training.deepspeed.enabled") not in _keys(check_config(cfg, device="cuda", device_memory_gib=80))


@pytest.mark.parametrize("stage,flagged", [(0, True), (1, False), (2, False), (3, False)])
def test_check_config_flags_offload_at_stage_0(stage: int, flagged: bool) -> None:
    cfg = load_config({"training": {"deepspeed": {"enabled": True, "zero_stage": stage, "offload": True}}})
    found = [f for f in check_config(cfg, device="cuda", device_memory_gib=80) if f.key == "training.deepspeed.offload"]
    assert [(f.severity, f.message) for f in found] == (
        [("warning", "offload needs ZeRO stage 1 or higher")] if flagged else []
    )


@pytest.mark.parametrize(
    "warmup,epochs,scheduler,flagged",
    [(2, 2, "cosine", True), (3, 2, "cosine", True), (1.99, 2, "cosine", False), (0, 2, "cosine", False)],
)
def test_check_config_flags_warmup_not_below_epochs(warmup: float, epochs: int, scheduler: str, flagged: bool) -> None:
    cfg = load_config({"training": {"num_epochs": epochs, "scheduler": {"name": scheduler, "warmup_epochs": warmup}}})
    found = [f for f in check_config(cfg, device="cuda", device_memory_gib=80) if f.key.endswith("warmup_epochs")]
    assert len(found) == flagged and all(f.severity == "warning" for f in found), found
    if flagged:
        assert f"warmup_epochs={cfg.training.scheduler.warmup_epochs} is not below num_epochs={epochs}" in (
            found[0].message
        )


def test_check_config_flags_more_workers_than_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for workers, flagged in ((4, False), (5, True), (0, False)):
        cfg = load_config({"data": {"num_workers": workers}})
        found = [f for f in check_config(cfg, device="cpu") if f.key == "data.num_workers"]
        assert len(found) == flagged, (workers, found)
    (finding,) = found_five = [
        f for f in check_config(load_config({"data": {"num_workers": 5}}), device="cpu") if f.key == "data.num_workers"
    ]
    assert finding.severity == "warning" and "more than the 4 CPUs" in finding.message, found_five
    assert finding.advice == "set data.num_workers to at most 4"


# ----------------------------------------------------------------------------------------------
# set_rng_state across a world-size change (no group: get_rank/get_world_size come from the launcher)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _seeded_state(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return checkpoint.rng_state()["ranks"][0]


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch):
    """Set RANK/WORLD_SIZE as a launcher would, without a process group."""

    def as_rank(rank: int, world: int) -> None:
        env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}
        for key, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
            monkeypatch.setenv(key, str(value))

    return as_rank


def test_set_rng_state_from_2_ranks_on_3_ranks_takes_rank_modulo(
    launcher_env, caplog: pytest.LogCaptureFixture
) -> None:
    saved = [_seeded_state(100), _seeded_state(200)]
    expected = []
    for seed in (100, 200):
        _seeded_state(seed)
        expected.append(_draws())
    state = {"world_size": 2, "ranks": saved}
    caplog.set_level(logging.WARNING)
    for rank, source in ((0, 0), (1, 1), (2, 0)):  # rank 2 of 3 takes saved rank 2 % 2 = 0
        launcher_env(rank, 3)
        caplog.clear()
        checkpoint.set_rng_state(state)
        assert _draws() == expected[source], rank
        assert f"saved by 2 rank(s), this job has 3: rank {rank} takes saved rank {source}'s" in caplog.text
    launcher_env(1, 2)  # the same world size: one to one, and no warning
    caplog.clear()
    checkpoint.set_rng_state(state)
    assert _draws() == expected[1] and "saved by" not in caplog.text
    launcher_env(0, 1)  # shrunk to one rank: rank 0's stream
    checkpoint.set_rng_state(state)
    assert _draws() == expected[0]


# ----------------------------------------------------------------------------------------------
# Real ranks


def adopt_foreign_group(port: int) -> int:
    """The group is made by "another framework": its own TCP rendezvous and a rank order reversed from the
    launcher's. init_distributed must adopt it (the group's rank is the truth), not make a second one."""
    import torch.distributed as dist

    from ratlib import comm, dist_init

    env_rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1 - env_rank, world_size=2)
    group = dist.group.WORLD
    info = dist_init.init_distributed(device="cpu", connect_timeout=5)  # MASTER_PORT: nobody listens there
    assert (info.rank, info.world_size, info.backend) == (1 - env_rank, 2, "gloo"), info
    assert dist.group.WORLD is group and dist_init.get_rank() == 1 - env_rank
    assert comm.all_gather_object(info.rank) == [0, 1]  # the adopted group works
    assert dist_init.init_distributed(device="cpu") is info  # idempotent on the adopted group too
    print(f"adopted env rank {env_rank} as rank {info.rank}", flush=True)
    dist_init.shutdown()
    return 0


@pytest.mark.distributed
def test_init_distributed_adopts_a_group_made_by_another_framework() -> None:
    closed = free_port()  # MASTER_PORT points here: a second rendezvous would fail within connect_timeout
    run = run_on_ranks(
        adopt_foreign_group, 2, args=(free_port(),), env={"MASTER_PORT": str(closed)}, timeout=120
    ).check()
    assert "adopted env rank 0 as rank 1" in run.stdouts[0] and "adopted env rank 1 as rank 0" in run.stdouts[1]


def main_raises_first(folder: str) -> int:
    from ratlib import distributed
    from ratlib.dist_init import main_process_first

    with distributed(device="cpu", timeout=60) as info:
        with main_process_first():
            Path(folder, f"entered-{info.rank}").touch()
            print(f"rank {info.rank} in the block", flush=True)
            if info.is_main:
                raise RuntimeError("download failed on the main rank")
    return 0


@pytest.mark.distributed
def test_main_process_first_when_the_main_rank_raises(tmp_path: Path) -> None:
    run = run_on_ranks(main_raises_first, 2, args=(str(tmp_path),), timeout=120)
    assert not run.timed_out and run.hung_ranks == [], str(run)  # rank 1 did not wait forever (nor for 60 s)
    assert run.returncodes[0] != 0 and "download failed on the main rank" in run.outputs[0], str(run)
    assert run.returncodes[1] != 0, str(run)  # it fails in its barrier: the main rank's group went away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entered-0"]  # rank 1 was never let into the block
    assert "rank 1 in the block" not in run.outputs[1]


def reduce_in_other_orders() -> int:
    from ratlib import comm, distributed

    with distributed(device="cpu") as info:
        r = info.rank
        d = {"a": 1.0 + r, "b": torch.tensor(10.0 * (r + 1)), "c": 100}
        if r == 1:  # the same keys, inserted in another order
            d = {"c": 300, "b": d["b"], "a": d["a"]}
        mean = comm.reduce_dict(d)
        total = comm.reduce_dict(dict(reversed(list(d.items()))) if r == 0 else d, average=False)
        assert list(mean) == ["a", "b", "c"] and list(total) == ["a", "b", "c"], (mean, total)
        assert mean["a"] == 1.5 and mean["b"].item() == 15.0 and mean["c"] == 200.0, mean  # a 1+2, b 10+20, c 100+300
        assert total["a"] == 3.0 and total["b"].item() == 30.0 and total["c"] == 400.0, total
        print(f"rank {r} ok", flush=True)
    return 0


@pytest.mark.distributed
def test_reduce_dict_matches_values_by_key_not_by_position() -> None:
    run = run_on_ranks(reduce_in_other_orders, 2, timeout=120).check()
    assert all(f"rank {r} ok" in run.stdouts[r] for r in range(2))


def save_on_the_main_rank_only(folder: str) -> int:
    from ratlib import distributed

    with distributed(device="cpu", timeout=20) as info:  # an unmatched barrier fails in 20 s, not 30 min
        if info.is_main:  # only the main rank calls save: with sync=False nobody waits for the others
            path = checkpoint.save({"step": 7}, Path(folder) / "main.pt", sync=False)
            assert path == Path(folder) / "main.pt" and path.is_file()
        else:  # a non-main rank that calls it writes nothing and does not block
            assert checkpoint.save({"step": 8}, Path(folder) / "other.pt", sync=False) == Path(folder) / "other.pt"
            assert not (Path(folder) / "other.pt").exists()
        torch.distributed.barrier()  # the one barrier both ranks reach
        assert checkpoint.load(Path(folder) / "main.pt")["step"] == 7
        assert not (Path(folder) / "other.pt").exists()
        torch.distributed.barrier()
        print(f"rank {info.rank} ok", flush=True)
    return 0


@pytest.mark.distributed
def test_checkpoint_save_without_sync_needs_only_the_main_rank(tmp_path: Path) -> None:
    run = run_on_ranks(save_on_the_main_rank_only, 2, args=(str(tmp_path),), timeout=120).check()
    assert all(f"rank {r} ok" in run.stdouts[r] for r in range(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.pt"]  # no temporary file left


def watchdog_with_the_store_gone() -> int:
    import time

    import torch.distributed as dist

    from ratlib import hang
    from ratlib.dist_init import init_distributed
    from ratlib.rank_logger import setup_logging

    setup_logging()
    info = init_distributed(device="cpu", timeout=20, connect_timeout=30)
    if info.rank == 1:
        hang.install(stall_timeout=1.0, dump_signal=None)  # aborts after the dump (the default)
    dist.barrier()  # rank 1's watchdog holds its store client now
    if info.rank == 0:
        os._exit(0)  # the store's host goes away without a word
    hang.heartbeat(7)
    time.sleep(120)  # the stall: the watchdog must report it alone and end the process
    return 0


@pytest.mark.distributed
def test_hang_watchdog_reports_alone_when_the_store_is_unreachable() -> None:
    from ratlib.hang import HANG_EXIT_CODE

    run = run_on_ranks(watchdog_with_the_store_gone, 2, timeout=150)
    assert not run.timed_out and run.returncodes == [0, HANG_EXIT_CODE], str(run)
    out = run.outputs[1]
    assert "no heartbeat for" in out and "last step 7" in out, out
    assert "the store is unreachable" in out and "1 of 2 rank(s) stalled" in out, out
    assert "the other ranks' reports are in their own logs" in out


# ----------------------------------------------------------------------------------------------
# memory_report(reset=True)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_memory_report_reset_starts_a_new_peak() -> None:
    from ratlib.memory import memory_report, peak_memory

    def touch(mib: int) -> np.ndarray:
        return np.ones(mib * 2**20, dtype=np.uint8)  # written, so resident

    block = touch(300)
    del block
    before = memory_report(device="cpu", warn_fraction=None)  # reset=False: the peak stays
    assert before.max.peak >= 300 * 2**20 and peak_memory("cpu").peak >= 300 * 2**20
    report = memory_report(device="cpu", warn_fraction=None, reset=True)
    assert report.max.peak >= 300 * 2**20  # the report is of the peak before the reset
    after = peak_memory("cpu").peak
    assert after < report.max.peak - 200 * 2**20, (after, report.max.peak)  # a new peak: the block is gone
    block = touch(100)
    assert peak_memory("cpu").peak >= after + 90 * 2**20  # and it counts again from there
    del block


# ----------------------------------------------------------------------------------------------
# ratlib doctor --gpu-memory


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(
        [sys.executable, "-m", "ratlib", "doctor", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_doctor_gpu_memory_checks_for_the_training_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  batch_size: 8\n  mixed_precision: bf16\n")
    if not torch.cuda.is_available():  # on this CPU machine: the CPU-only note, unless the GPUs are named
        assert "training.mixed_precision" in _doctor(str(cfg)).stdout
    out = _doctor(str(cfg), "--gpu-memory", "16")
    assert out.returncode == 0, out.stderr
    assert "training.mixed_precision" not in out.stdout, out.stdout  # checked as for a 16 GiB GPU, not this CPU
    bad = _doctor(str(cfg), "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr

    from ratlib import cli
    from ratlib.doctor import configs as doctor

    seen: list[tuple[object, object]] = []
    real = doctor.check_config
    monkeypatch.setattr(
        doctor,
        "check_config",
        lambda cfg_, world, **kw: (
            seen.append((kw.get("device"), kw.get("device_memory_gib"))) or real(cfg_, world, **kw)
        ),
    )
    assert cli.main(["doctor", str(cfg), "--device", "cuda", "--gpu-memory", "40"]) == 0
    assert seen == [("cuda", 40.0)]  # the figure reaches check_config, the memory budget of its model check

"""ratlib.comm: the same answers and types with no process group as over real gloo ranks."""

from __future__ import annotations

import sys

import dist_targets
import pytest
import torch

from ratlib import comm
from ratlib.testing import run_on_ranks


@pytest.fixture(autouse=True)
def _no_group() -> None:
    assert not torch.distributed.is_initialized()


def test_all_reduce_mean_without_a_group() -> None:
    x = torch.tensor([1.0, 3.0], requires_grad=True)
    out = comm.all_reduce_mean(x)
    assert torch.equal(out, x.detach()) and out is not x and not out.requires_grad
    ints = comm.all_reduce_mean(torch.tensor([1, 2]))
    assert ints.dtype == torch.float32 and ints.tolist() == [1.0, 2.0]  # as t / n gives, at any world size
    assert comm.all_reduce_mean(torch.tensor([True])).dtype == torch.float32
    assert comm.all_reduce_mean(torch.tensor(2.0, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert comm.all_reduce_mean(3) == 3.0 and isinstance(comm.all_reduce_mean(3), float)
    with pytest.raises(TypeError, match="Got: str .* Expected: a tensor or a real number"):
        comm.all_reduce_mean("3")


def test_reduce_dict_without_a_group() -> None:
    src = {"loss": torch.tensor(0.5), "n": torch.tensor([4]), "acc": 1}
    mean = comm.reduce_dict(src)
    assert list(mean) == ["acc", "loss", "n"] and mean["acc"] == 1.0 and isinstance(mean["acc"], float)
    assert mean["loss"].dtype == torch.float32 and mean["loss"] is not src["loss"]
    assert mean["n"].dtype == torch.float32 and mean["n"].shape == (1,)
    total = comm.reduce_dict(src, average=False)
    assert total["n"].dtype == torch.int64 and total["n"].item() == 4
    with pytest.raises(ValueError, match=r"d\['v'\] has shape \(2,\). Expected: one element"):
        comm.reduce_dict({"v": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"d\['v'\] is a str"):
        comm.reduce_dict({"v": "1.0"})
    with pytest.raises(TypeError, match="key 3 is a int. Expected: str keys"):
        comm.reduce_dict({3: 1.0})


def test_object_collectives_without_a_group() -> None:
    assert comm.gather_object({"a": 1}) == [{"a": 1}]
    assert comm.all_gather_object([1, 2]) == [[1, 2]]
    assert comm.broadcast_object("x") == "x"
    with pytest.raises(ValueError, match=r"dst=1 is not a rank of this job \(world size 1\). Expected: 0..0"):
        comm.gather_object("x", dst=1)  # the same mistake fails at world size 1 as at scale
    with pytest.raises(ValueError, match="src=2 is not a rank of this job"):
        comm.broadcast_object("x", src=2)


def test_every_collective_calls_the_registered_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """public function -> _before_collective -> the hook ratlib.hang registers: hang reads frame 2 for the call site."""
    seen: list[tuple[str, str, str]] = []

    def before_collective(op: str) -> None:
        caller = sys._getframe(1).f_code.co_name
        public = sys._getframe(2).f_code.co_name
        seen.append((op, caller, public))

    monkeypatch.setattr(comm, "_collective_hook", None)
    comm.set_collective_hook(before_collective)
    comm.all_reduce_mean(1.0)
    comm.reduce_dict({"a": 1.0})
    comm.gather_object(1)
    comm.all_gather_object(1)
    comm.broadcast_object(1)
    ops = ["all_reduce_mean", "reduce_dict", "gather_object", "all_gather_object", "broadcast_object"]
    assert seen == [(op, "_before_collective", op) for op in ops]
    comm.set_collective_hook(None)
    comm.broadcast_object(1)
    assert len(seen) == len(ops)  # unregistered: not called


def test_hang_registers_its_collective_check_with_comm() -> None:
    from ratlib import hang

    hang.install(check_collectives=True, dump_signal=None)
    try:
        assert comm._collective_hook is hang.before_collective
    finally:
        hang.uninstall()
    assert comm._collective_hook is None


@pytest.mark.distributed
def test_collectives_over_two_open_mpi_ranks() -> None:
    """Types, rank arguments and a reduce_dict key mismatch, on ranks started with Open MPI's variables."""
    run = run_on_ranks(dist_targets.comm_edge_cases, 2, launcher="openmpi", timeout=120).check()
    for r in range(2):
        assert f"OK rank={r} launcher=openmpi local={r}/2" in run.stdouts[r]


@pytest.mark.distributed
def test_collectives_refuse_to_run_per_rank_without_a_group() -> None:
    """Under a 2-process launcher with no init_distributed, a collective is an error, never a per-rank answer."""
    run = run_on_ranks(dist_targets.collectives_without_a_group, 2, timeout=120).check()
    for r in range(2):
        out = run.stdouts[r]
        assert "ANSWERED" not in out, out
        for op in ("all_reduce_mean", "reduce_dict", "gather_object", "all_gather_object", "broadcast_object"):
            assert f"REFUSED {op}: {op}: no process group on rank {r} of 2" in out, out
        assert "Fix: call ratlib.init_distributed() (or use `with ratlib.distributed():`) on every rank first" in out


def test_collectives_without_a_group_at_world_size_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert comm.reduce_dict({"loss": 2.0}) == {"loss": 2.0} and comm.gather_object(3) == [3]
    comm.assert_same({"a": 1})  # one rank: nothing to compare
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert comm.all_reduce_mean(4) == 4.0 and comm.broadcast_object("x") == "x"
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(comm.NoProcessGroupError, match="all_gather_object: no process group on rank 0 of 3"):
        comm.all_gather_object(1)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world_size,odd_rank",
    [
        (2, 1),
        (3, 2),
        # torch 2.3's destroy_process_group hung on rank 0 (the store's host) after the others had left, 2 runs in
        # 6 under load (faulthandler: in shutdown's destroy_process_group); torch 2.15 does not
        pytest.param(3, 0, marks=pytest.mark.needs_torch("2.4", "torch 2.3 can hang in rank 0's group teardown")),
    ],
)
def test_assert_same_names_the_ranks_and_the_nested_key(world_size: int, odd_rank: int) -> None:
    run = run_on_ranks(dist_targets.assert_same_config, world_size, args=(odd_rank,), timeout=120).check()
    others = [r for r in range(world_size) if r != odd_rank]
    for r in range(world_size):
        out = run.stdouts[r]
        assert "NO MISMATCH" not in out and "MISMATCH config differs across ranks" in out, out
        if world_size == 2:  # no majority: both ranks are named
            assert "ranks 0-1 hold a different config than each other" in out, out
        else:
            assert f"rank {odd_rank} holds a different config than the others" in out, out
        pairs = sorted([(others[0], f"0.001 on {_ranks(others)}"), (odd_rank, f"0.01 on rank {odd_rank}")])
        shown = ", ".join(text for _, text in pairs)  # values in the order of the first rank holding each
        assert f"differing keys: training.optimizer.lr: {shown}. Fix: start every rank with the same config" in out
        assert "training.batch_size" not in out and "seed" not in out.split("MISMATCH", 1)[1], out


def _ranks(ranks: list[int]) -> str:
    """Consecutive ranks only, as the tests above use them: [1] -> 'rank 1', [0, 1] -> 'ranks 0-1'."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"

"""ratlib.data: exact sharding (hypothesis over sizes, ranks, batches, epochs and cut points) and the
coverage-checked gather, also over real gloo ranks."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratlib.data import CoverageError, EvalSampler, ShardedBatchSampler, ShardingError, gather_by_index
from ratlib.errors import RatlibError
from ratlib.testing import run_on_ranks


def _indices(batch: list) -> list[int]:
    return [x[0] if isinstance(x, tuple) else x for x in batch]


def _ranks(n: int, batch: int, world: int, **kwargs) -> list[ShardedBatchSampler]:
    return [ShardedBatchSampler(n, batch, rank=r, world_size=world, **kwargs) for r in range(world)]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 120),
    world=st.integers(1, 8),
    batch=st.integers(1, 12),
    epoch=st.integers(0, 5),
    grouped=st.booleans(),
    shuffle=st.booleans(),
)
def test_every_index_once_and_the_ranks_in_step(
    n: int, world: int, batch: int, epoch: int, grouped: bool, shuffle: bool
) -> None:
    groups = [i % 3 == 0 for i in range(n)] if grouped else None
    if n < world:
        with pytest.raises(ShardingError, match="every rank needs at least one"):
            ShardedBatchSampler(n, batch, rank=0, world_size=world)
        return
    samplers = _ranks(n, batch, world, seed=3, shuffle=shuffle, group_ids=groups)
    for s in samplers:
        s.set_epoch(epoch)
    batches = [list(s) for s in samplers]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(samplers[0])  # ranks in step
    seen = [i for b in batches for x in b for i in _indices(x)]
    assert sorted(seen) == list(range(n))  # every index exactly once: nothing padded or repeated
    for step in zip(*batches):
        sizes = [len(x) for x in step]
        assert min(sizes) >= 1  # no rank idles at a step
        assert max(sizes) <= max(batch, 2)  # at most batch_size (two with batch_size 1 and an uneven split)
        if not grouped:
            assert max(sizes) - min(sizes) <= 1
    assert [list(s) for s in samplers] == batches  # deterministic per (seed, epoch)
    for b in batches:  # a rank's batches are even: sizes differ by at most one
        assert max(map(len, b)) - min(map(len, b)) <= 1
        if grouped:  # grouped by aspect: at most one mixed batch per rank
            assert sum(len({groups[i] for i in x}) > 1 for x in b) <= 1


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 100),
    world=st.integers(1, 6),
    batch=st.integers(1, 9),
    epoch=st.integers(0, 3),
    cut=st.integers(0, 30),
    seeds=st.booleans(),
)
def test_a_state_from_mid_epoch_resumes_exactly_the_batches_left(
    n: int, world: int, batch: int, epoch: int, cut: int, seeds: bool
) -> None:
    if n < world:
        return
    for rank in range(world):
        whole = ShardedBatchSampler(n, batch, rank=rank, world_size=world, seed=7, augmentation_seeds=seeds)
        whole.set_epoch(epoch)
        expected = list(whole)
        run = ShardedBatchSampler(n, batch, rank=rank, world_size=world, seed=7, augmentation_seeds=seeds)
        run.set_epoch(epoch)
        it = iter(run)
        done = [next(it) for _ in range(min(cut, len(expected)))]
        state = json.loads(json.dumps(run.state_dict()))  # plain data: goes into any checkpoint
        fresh = ShardedBatchSampler(n, batch, rank=rank, world_size=world, seed=7, augmentation_seeds=seeds)
        fresh.load_state_dict(state)
        if len(done) == len(expected):  # the epoch was finished: the next one starts
            assert fresh.epoch == epoch + 1 and len(fresh) == len(expected)
            continue
        fresh.set_epoch(epoch)  # what a loop does at the top of the epoch: keeps the restored position
        assert len(fresh) == len(expected) - len(done)
        assert done + list(fresh) == expected
        fresh.set_epoch(epoch + 1)  # the position applies to its own epoch only
        assert len(fresh) == fresh.batches_per_epoch


def test_len_of_a_resumed_sampler_stays_put_while_a_loader_iterates_it() -> None:
    """A progress logger reads ``len(loader)`` at every step: in a resumed epoch it must stay the batches that
    iteration yields (5 of 8 here), also once the loader's workers have drained the sampler ahead of the loop."""
    import torch
    from torch.utils.data import DataLoader

    first = ShardedBatchSampler(32, 4, rank=0, world_size=1, seed=1)
    assert len(first) == first.batches_per_epoch == 8
    it = iter(first)
    for _ in range(3):
        next(it)
    sampler = ShardedBatchSampler(32, 4, rank=0, world_size=1, seed=1)
    sampler.load_state_dict(first.state_dict())
    sampler.set_epoch(0)  # the same epoch: the position stays
    for workers in (0, 2):
        if workers:
            sampler.load_state_dict(first.state_dict())
        loader = DataLoader(torch.arange(32), batch_sampler=sampler, num_workers=workers)
        lengths, steps = [len(loader)], 0
        for _ in loader:
            steps += 1
            lengths.append(len(loader))
        assert steps == 5 and lengths == [5] * 6, (workers, lengths)
    sampler.set_epoch(1)
    assert len(sampler) == 8 and len(list(sampler)) == 8


def test_augmentation_seeds_depend_on_seed_and_epoch_only() -> None:
    a, b = (ShardedBatchSampler(20, 4, rank=0, world_size=2, seed=1, augmentation_seeds=True) for _ in range(2))
    first = list(a)
    assert first == list(b) and all(isinstance(x, tuple) and len(x) == 2 for batch in first for x in batch)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ShardedBatchSampler(20, 4, rank=0, world_size=2, seed=2, augmentation_seeds=True)) != first


def test_seven_samples_two_ranks_batch_four() -> None:
    """data.limit=7 on 2 ranks with batch 4: one step, 4 + 3 samples."""
    s0, s1 = _ranks(7, 4, 2)
    (b0,), (b1,) = list(s0), list(s1)
    assert sorted(b0 + b1) == list(range(7)) and (len(b0), len(b1)) == (4, 3)
    s0.set_epoch(1)
    assert list(s0) != [b0]


def test_mid_epoch_state_with_another_sharding_is_refused() -> None:
    s = ShardedBatchSampler(40, 4, rank=0, world_size=2)
    it = iter(s)
    next(it)
    state = s.state_dict()
    with pytest.raises(ShardingError, match="world_size 2 \\(now 4\\)") as info:
        ShardedBatchSampler(40, 4, rank=0, world_size=4).load_state_dict(state)
    assert isinstance(info.value, RatlibError) and isinstance(info.value, ValueError)
    done = {**state, "position": 0}  # an epoch boundary: any sharding may resume
    other = ShardedBatchSampler(40, 4, rank=0, world_size=4)
    other.load_state_dict(done)
    assert other.epoch == 0 and len(other) == other.batches_per_epoch
    assert s.state_dict(position=0)["position"] == 0  # the loop's own count wins over the prefetched one


def test_bad_arguments_are_sharding_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ShardingError, match="batch_size=0"):
        ShardedBatchSampler(10, 0, rank=0, world_size=1)
    with pytest.raises(ShardingError, match="rank 2 is not a rank of world size 2"):
        ShardedBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ShardingError, match="3 group ids for 10 samples"):
        ShardedBatchSampler(10, 2, rank=0, world_size=1, group_ids=[0, 1, 0])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert ShardedBatchSampler(10, 2).world_size == 1 and EvalSampler(3).rank == 0  # from the launcher


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 60), world=st.integers(1, 9))
def test_eval_sampler_covers_every_index_once_also_with_fewer_samples_than_ranks(n: int, world: int) -> None:
    parts = [list(EvalSampler(n, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert [len(EvalSampler(n, rank=r, world_size=world)) for r in range(world)] == [len(p) for p in parts]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_gather_by_index_without_a_group() -> None:
    assert gather_by_index({1: "b", 0: "a"}, 2) == {0: "a", 1: "b"}
    assert gather_by_index({}, 0) == {}
    with pytest.raises(CoverageError, match=r"1 of 3 indices missing \(2\)"):
        gather_by_index({0: 1, 1: 1}, 3)
    with pytest.raises(CoverageError, match=r"outside 0..1 \(5\)"):
        gather_by_index({0: 1, 1: 1, 5: 1}, 2)


def gather_on_ranks(n: int, mode: str) -> int:
    """Each rank evaluates its EvalSampler share; ``mode`` "drop" loses index 0, "twice" has every rank
    also return index 0 (a padding sampler's repeat)."""
    from ratlib import dist_init

    with dist_init.distributed(device="cpu") as info:
        results = {i: i * i for i in EvalSampler(n)}
        if mode == "drop":
            results.pop(0, None)
        if mode == "twice":
            results[0] = 0
        try:
            merged = gather_by_index(results, n)
        except CoverageError as exc:
            print(f"rank {info.rank} CoverageError: {exc}", flush=True)
            return 3
        expected = {i: i * i for i in range(n)} if info.is_main else None
        assert merged == expected, merged
        print(f"rank {info.rank} OK", flush=True)
    return 0


@pytest.mark.distributed
@pytest.mark.parametrize("n", [2, 11])  # 2: fewer samples than the 3 ranks (one rank has none)
def test_gather_by_index_on_three_ranks(n: int) -> None:
    run = run_on_ranks(gather_on_ranks, 3, args=(n, "ok"), timeout=120).check()
    assert all(f"rank {r} OK" in run.stdouts[r] for r in range(3))


@pytest.mark.distributed
def test_gather_by_index_names_missing_and_duplicated_indices_on_every_rank() -> None:
    run = run_on_ranks(gather_on_ranks, 2, args=(5, "drop"), timeout=120)
    assert run.returncodes == [3, 3], str(run)  # every rank raises: none waits in a later collective
    assert all("1 of 5 indices missing (0)" in out for out in run.stdouts)
    run = run_on_ranks(gather_on_ranks, 2, args=(5, "twice"), timeout=120)
    assert run.returncodes == [3, 3], str(run)
    assert "indices returned by more than one rank (0 on ranks [0, 1])" in run.stdouts[0]


def eval_with_an_empty_shard(n: int) -> int:
    """The evaluation shape docs/data.md gives, on ranks of which some have no samples: train a step through
    DDP, evaluate the unwrapped model, then every ratlib helper an evaluation uses, on every rank."""
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from ratlib import comm, dist_init
    from ratlib.memory import memory_report
    from ratlib.rank_logger import progress, setup_logging

    setup_logging("INFO")
    with dist_init.distributed(device="cpu", connect_timeout=60) as info:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        ddp = DistributedDataParallel(model)
        ddp(torch.randn(4, 3)).sum().backward()  # a training step: DDP will sync buffers at its next forward
        model.eval()  # evaluate the module, not the wrapper: ranks with fewer batches must not owe a collective
        sampler = EvalSampler(n)
        loader = DataLoader(torch.arange(n, dtype=torch.float32).repeat(3, 1).T, sampler=sampler, batch_size=2)
        per_sample, loss_sum, count = {}, 0.0, 0
        with torch.no_grad():
            for i, batch in enumerate(progress(loader, desc="eval")):  # a bar on rank 0, whatever its length
                out = model(batch)
                loss_sum, count = loss_sum + float(out.sum()), count + len(batch)
                per_sample.update(zip(list(sampler)[2 * i : 2 * i + 2], out[:, 0].tolist()))
        merged = gather_by_index(per_sample, n)
        totals = comm.reduce_dict({"loss_sum": loss_sum, "count": float(count)}, average=False)
        mean = totals["loss_sum"] / totals["count"] if totals["count"] else float("nan")
        everyone = comm.all_gather_object(len(sampler))
        on_main = comm.gather_object(sorted(per_sample))
        report = memory_report(warn_fraction=None)
        assert len(report.ranks) == info.world_size and report.table() and report.to_metrics()
        assert sum(everyone) == n and totals["count"] == n
        assert (merged is not None) == info.is_main and (on_main is not None) == info.is_main
        print(f"rank {info.rank} samples {len(sampler)} batches {len(loader)} mean {mean:.3f} OK", flush=True)
    return 0


@pytest.mark.distributed
@pytest.mark.parametrize("n", [2, 0])  # 2 samples on 3 ranks: rank 2 has none; 0: every rank has none
def test_evaluation_helpers_with_an_empty_shard_on_three_ranks(n: int) -> None:
    run = run_on_ranks(eval_with_an_empty_shard, 3, args=(n,), timeout=120).check()
    assert "rank 2 samples 0 batches 0" in run.stdouts[2] and all("OK" in out for out in run.stdouts)


def test_data_imports_no_torch() -> None:
    import subprocess

    code = "import ratlib.data, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------------------------
# Global batches: the same global batches at any world size, and a resume on another number of ranks


def _global(n: int, g: int, world: int, micro: int | None = None, **kwargs) -> list[ShardedBatchSampler]:
    return [
        ShardedBatchSampler(n, global_batch_size=g, micro_batch_size=micro, rank=r, world_size=world, **kwargs)
        for r in range(world)
    ]


def _global_steps(samplers: list[ShardedBatchSampler]) -> list[list[int]]:
    """The job's global batches, in order: step k is every rank's micro-batches of step k, put together."""
    per_rank = [[_indices(b) for b in s] for s in samplers]
    a = samplers[0].accumulation_steps
    steps = len(per_rank[0]) // a
    return [sorted(i for rank in per_rank for b in rank[k * a : (k + 1) * a] for i in b) for k in range(steps)]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 150),
    g=st.integers(1, 40),
    world=st.integers(1, 6),
    other=st.integers(1, 6),
    micro=st.one_of(st.none(), st.integers(1, 8)),
    epoch=st.integers(0, 3),
    cut=st.floats(0, 1),
)
def test_global_batches_do_not_depend_on_the_world_size_and_resume_on_another(
    n: int, g: int, world: int, other: int, micro: int | None, epoch: int, cut: float
) -> None:
    def build(w: int) -> list[ShardedBatchSampler] | None:
        try:
            return _global(n, g, w, micro, seed=3, augmentation_seeds=True)
        except ShardingError as exc:  # a last global batch too small for this many ranks: said before training
            assert "cannot give each of" in str(exc) and "use at most" in str(exc)
            return None

    one = _global(n, g, 1, None, seed=3)  # the reference: one process, the whole global batch a step
    for s in one:
        s.set_epoch(epoch)
    reference = [sorted(b) for b in (_indices(b) for b in one[0])]
    assert sorted(i for b in reference for i in b) == list(range(n))  # every index once per epoch
    first, second = build(world), build(other)
    if first is None or second is None:
        return
    for s in first:
        s.set_epoch(epoch)
    assert _global_steps(first) == reference  # the same global batches, whatever the world size
    lengths = {len(list(s)) for s in first}
    assert lengths == {first[0].steps_per_epoch * first[0].accumulation_steps}  # the ranks in step
    # stop after `done` global steps on `world` ranks, resume on `other` ranks
    done = int(cut * first[0].steps_per_epoch)
    states = {json.dumps(s.state_dict(position=done * s.accumulation_steps), sort_keys=True) for s in first}
    assert len(states) == 1  # the same state on every rank: the job's position, not a rank's
    state = json.loads(states.pop())
    for s in second:
        s.load_state_dict(state)
    if done == first[0].steps_per_epoch:
        assert second[0].epoch == epoch + 1
        return
    assert _global_steps(second) == reference[done:]  # exactly the batches that were left, none twice
    seeds = {i: sd for s in second for b in s for i, sd in b} if second[0].augmentation_seeds else {}
    whole = {i: sd for s in first for b in s for i, sd in b}
    assert all(whole[i] == sd for i, sd in seeds.items())  # augmentation follows the sample, not the rank


def test_loss_scale_makes_the_gradient_the_mean_over_the_global_batch() -> None:
    # 10 samples, global batch 4, 3 ranks: steps of 4, 4 and 2 samples; parts of 2/1/1 and 1/1/0 are refused
    with pytest.raises(ShardingError, match="use at most 2 rank"):
        _global(10, 4, 3)
    samplers = _global(10, 4, 2)
    assert [s.global_size(k) for s in samplers[:1] for k in range(3)] == [4, 4, 2]
    # a rank's summed loss times loss_scale / batch_len, averaged over ranks (DDP), is the global mean
    values = {i: float(i * i) for i in range(10)}
    for k, parts in enumerate(zip(*(list(s) for s in samplers))):
        mean = sum(sum(values[i] for i in part) * samplers[0].loss_scale(1, k) for part in parts) / 2
        assert mean == pytest.approx(sum(values[i] for part in parts for i in part) / samplers[0].global_size(k))


def test_a_global_state_is_refused_by_a_per_rank_sampler_and_another_dataset_is_named() -> None:
    state = _global(40, 8, 2)[0].state_dict()
    with pytest.raises(ShardingError, match="with global batches into a per-rank sampler"):
        ShardedBatchSampler(40, 4, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ShardingError, match="num_samples 40 .now 48."):
        _global(48, 8, 3)[0].load_state_dict(state)
    with pytest.raises(ShardingError, match="global_batch_size 8 .now 16."):
        _global(40, 16, 1)[0].load_state_dict(state)
    with pytest.raises(ShardingError, match="exactly one of batch_size"):
        ShardedBatchSampler(40, 4, global_batch_size=8, rank=0, world_size=1)
    with pytest.raises(ShardingError, match="not at a step boundary"):
        _global(40, 8, 2, micro=2)[0].state_dict(position=1)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (2, 1),
        pytest.param(2, 3, marks=pytest.mark.slow),
        pytest.param(3, 2, marks=pytest.mark.slow),
        pytest.param(1, 2, marks=pytest.mark.slow),
    ],
)
def test_a_run_stopped_on_n_ranks_continues_on_m_with_the_same_losses(tmp_path, before: int, after: int) -> None:
    """float64, a deterministic model, global batches of 12 over 51 samples (the last step of each epoch has 3):
    stopped after step 7 (mid-epoch) on N ranks and resumed on M, every later step's global loss and the final
    weights match an uninterrupted N-rank run within 1e-9 (the all-reduce order differs with M)."""
    import global_batch_targets as target
    import torch

    env = {"CUDA_VISIBLE_DEVICES": ""}
    run_on_ranks(target.run, before, args=(str(tmp_path), -1, False), env=env, timeout=120).check()
    run_on_ranks(target.run, before, args=(str(tmp_path), 7, False), env=env, timeout=120).check()
    run_on_ranks(target.run, after, args=(str(tmp_path), -1, True), env=env, timeout=120).check()
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["world_size"] == after and sorted(map(int, resumed["losses"])) == list(range(8, 16))
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(whole["losses"][step], rel=1e-9), step
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a)


def test_global_size_counts_every_sample_once_with_per_rank_batches_too() -> None:
    # per-rank batches: the ranks' step-k batches together, so loss_scale also weighs their uneven sizes exactly
    sampler = _ranks(23, 4, 3)[0]
    steps = [sampler.global_size(k) for k in range(sampler.steps_per_epoch)]
    assert sum(steps) == 23 and max(steps) - min(steps) <= 3
    per_step = [sum(len(b) for b in parts) for parts in zip(*(list(s) for s in _ranks(23, 4, 3)))]
    assert steps == per_step


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"num_samples": 48}, "num_samples 40 (now 48)"),
        ({"seed": 2}, "seed 1 (now 2)"),
        ({"global_batch_size": 16}, "global_batch_size 8 (now 16)"),
    ],
)
@pytest.mark.parametrize("position", [0, 2])  # an epoch boundary too: the order and the steps would change
def test_a_global_resume_with_another_data_set_seed_or_global_batch_names_both_values_and_the_fix(
    changed: dict, named: str, position: int
) -> None:
    saved = {"num_samples": 40, "global_batch_size": 8, "seed": 1}
    state = ShardedBatchSampler(**saved, rank=0, world_size=2).state_dict(position=position)
    with pytest.raises(ShardingError) as info:
        ShardedBatchSampler(**{**saved, **changed}, rank=2, world_size=3).load_state_dict(state)
    text = str(info.value)
    assert isinstance(info.value, RatlibError) and named in text, text
    assert "resume with the data set, training.seed and training.global_batch_size the run was saved with" in text
    assert "the number of ranks may change" in text


@pytest.mark.distributed
@pytest.mark.slow  # six rank processes: 22 s on 2 busy cores
def test_more_ranks_than_the_last_step_s_samples_is_one_error_on_every_rank_and_nothing_hangs(tmp_path) -> None:
    """10 samples, global batches of 4: the epoch's last step has 2 samples. Resumed before it on 2 ranks, each
    trains one sample; on 4, two ranks would have nothing, so every rank gets the same ShardingError before the
    loop (naming the world sizes that work) and all of them still meet at a collective: no rank waits."""
    import global_batch_targets as target

    env = {"CUDA_VISIBLE_DEVICES": ""}
    run_on_ranks(target.too_many_ranks, 2, args=(str(tmp_path),), env=env, timeout=60).check()
    two = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(b) for r in two for b in r["batches"]] == [1, 1] and all(r["epoch"] == 0 for r in two)
    assert sorted(i for r in two for b in r["batches"] for i in b) == sorted(
        _global_steps(_global(10, 4, 1, seed=5))[2]
    )  # the epoch's last global batch
    refused = run_on_ranks(target.too_many_ranks, 4, args=(str(tmp_path),), env=env, timeout=60)
    assert refused.returncodes == [3, 3, 3, 3] and not refused.hung_ranks, str(refused)
    four = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert len({r["error"] for r in four}) == 1 and all(r["met"] == 1.0 for r in four)
    assert "a global batch of 2 sample(s)" in four[0]["error"] and "use at most 2 rank(s)" in four[0]["error"]

"""Both examples under ``training.strategy=fsdp2`` on 2 real gloo ranks: they learn past the same thresholds as
under DDP, checkpoints are sharded folders (every rank writes its shards) that one process evaluates to the
same figures, a SIGTERM-stopped run resumes to the uninterrupted run's weights bit for bit, and a run stopped on
2 ranks resumes on 1 and on 3 with the same global batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_detection_example as D
import test_segmentation_example as S
import torch

import ratlib.checkpoint
from ratlib.testing.ranks import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.needs_torch("2.6", "FSDP2's fully_shard in torch.distributed.fsdp")]

FSDP2 = "training.strategy=fsdp2"
coco_root, msd_root, one_thread = D.coco_root, S.msd_root, S.one_thread  # the examples' tests' fixtures


def full(path: Path) -> dict:
    """A checkpoint (file or sharded folder) as whole tensors, read in this process with no group."""
    return ratlib.checkpoint.load(path)


def segmentation_learning(run: str, root: str) -> int:
    from ratlib import distributed, setup_logging

    torch.set_num_threads(1)
    setup_logging(log_dir=Path(run) / "logs")
    with distributed(device="cpu") as info:
        metrics = S.T.train(S.config(f"data.root={root}", f"output_dir={run}", FSDP2), run_dir=run, info=info)
        (Path(run) / f"returned{info.rank}.json").write_text(json.dumps(metrics))
    return 0


def test_segmentation_learns_with_fsdp2_and_one_process_evaluates_its_sharded_checkpoint(
    tmp_path: Path, msd_root: Path, one_thread: None
) -> None:
    run = tmp_path / "run"
    run_on_ranks(segmentation_learning, 2, args=(str(run), str(msd_root)), env=S.NO_GPU, timeout=300).check()
    final = S.metrics_rows(run)[-1]
    assert final["step"] == 10 * 6 and final["train_samples"] == final["train_unique_samples"] == 96
    assert final["dice_1"] >= S.DICE_THRESHOLD and final["dice_2"] >= S.DICE_THRESHOLD, final
    latest = ratlib.checkpoint.latest(run / "checkpoints")
    assert latest is not None and latest.is_dir() and (latest / "__1_0.distcp").is_file()  # rank 1 wrote shards
    returned = [json.loads((run / f"returned{r}.json").read_text()) for r in range(2)]
    assert returned[0] == returned[1] == {k: final[k] for k in returned[0]}
    one = S.T.evaluate_checkpoint(S.config(f"data.root={msd_root}"), run_dir=run, info=S.CPU)
    for key in ("dice", "dice_1", "dice_2"):
        assert one[key] == final[key], key


def detection_learning(run: str, root: str) -> int:
    from ratlib import distributed, setup_logging

    setup_logging(log_dir=Path(run) / "logs")
    with distributed(device="cpu") as info:
        config = D.config(f"output_dir={run}", f"data.root={root}", "training.max_steps=40", FSDP2)
        metrics = D.T.train(config, run_dir=run, info=info)
        (Path(run) / f"returned{info.rank}.json").write_text(json.dumps(metrics))
    return 0


@pytest.mark.slow
def test_detection_learns_with_fsdp2(tmp_path: Path, coco_root: Path, one_thread: None) -> None:
    run = tmp_path / "run"
    run_on_ranks(detection_learning, 2, args=(str(run), str(coco_root)), env=D.NO_GPU, timeout=400).check()
    final = D.metrics_rows(run)[-1]
    assert final["step"] == 40 and final["map50"] > D.AP50_THRESHOLD, final
    assert ratlib.checkpoint.latest(run / "checkpoints").is_dir()
    returned = [json.loads((run / f"returned{r}.json").read_text()) for r in range(2)]
    assert returned[0] == returned[1]


def preempted(run: str, root: str, signal_at: int, resume: bool) -> int:
    """``test_segmentation_example.preempt_run`` under FSDP2."""
    from ratlib import distributed

    torch.set_num_threads(1)
    S.signal_rank_1_after(S.T, signal_at)
    with distributed(device="cpu") as info:
        S.T.train(S.config(f"data.root={root}", *S.PREEMPT, FSDP2), run_dir=run, resume=resume, info=info)
    return 0


@pytest.mark.slow
def test_sigterm_to_rank_1_then_resume_gives_the_uninterrupted_fsdp2_weights_bit_for_bit(
    tmp_path: Path, msd_root: Path, one_thread: None
) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    go = dict(env=S.NO_GPU, timeout=300)
    run_on_ranks(preempted, 2, args=(str(whole), str(msd_root), 0, False), **go).check()
    stopped = run_on_ranks(preempted, 2, args=(str(split), str(msd_root), 4, False), **go)
    assert stopped.returncodes == [75, 75], str(stopped)
    mid = full(split / "checkpoints" / "epoch0001")  # the stop: mid-epoch 1, a sharded folder
    assert 0 < mid["sampler"]["position"] < 3 and mid["step"] == 3 + mid["sampler"]["position"]
    run_on_ranks(preempted, 2, args=(str(split), str(msd_root), 0, True), **go).check()
    a, b = full(whole / "checkpoints" / "epoch0001"), full(split / "checkpoints" / "epoch0001")
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    for key, state in a["optimizer"]["state"].items():  # keyed by parameter name under FSDP2
        assert all(torch.equal(v, b["optimizer"]["state"][key][n]) for n, v in state.items()), key
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("after", [1, 3])
def test_a_fsdp2_run_stopped_on_two_ranks_resumes_on_another_number_with_the_same_global_batches(
    tmp_path: Path, msd_root: Path, one_thread: None, after: int
) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    go = dict(env=S.NO_GPU, timeout=300)
    run_on_ranks(S.global_batch_run, 2, args=(str(whole), str(msd_root), 0, False, FSDP2), **go).check()
    stopped = run_on_ranks(S.global_batch_run, 2, args=(str(split), str(msd_root), 1, False, FSDP2), **go)
    assert stopped.returncodes == [75, 75], str(stopped)
    run_on_ranks(S.global_batch_run, after, args=(str(split), str(msd_root), 0, True, FSDP2), **go).check()
    first, second = S.global_batches(split, 0), S.global_batches(split, 1)
    assert not first.keys() & second.keys() and {**first, **second} == S.global_batches(whole, 0)
    ext = ".pt" if after == 1 else ""  # one process trains the bare model: whole-state files
    names = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert names == [f"epoch0000{ext}", f"epoch0001{ext}"], names  # the stop's epoch0000/ replaced, whatever format
    latest = ratlib.checkpoint.latest(split / "checkpoints")
    end = full(latest)
    assert end["step"] == 6 and end["sampler"]["world_size"] == after
    segments = json.loads((split / "segments.json").read_text())["segments"]
    assert [s["world_size"] for s in segments] == [2, after]

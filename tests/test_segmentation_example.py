"""examples/segmentation: data, sampling, Dice, learning on 1 and 2 ranks, resume, crash mid-save,
DeepSpeed, smoke mode and data.limit.

The learning tests train the shipped config (UNet 8-16-32, batch norm, AdamW 1e-2, 96
slices, 10 epochs) on the synthetic task; see ``DICE_THRESHOLD`` for what was measured.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from suite_rules import require, unavailable

from ratlib.checkpoint import RunCheckpoints  # save: a test crashes a save there
from ratlib.config_defaults import ConfigError, load_config, parse_args
from ratlib.strategy import Stepper, eval_loader

require("nibabel")

from example_helpers import _restore_logging, load_script, one_thread, signal_rank_1_after  # noqa: E402, F401  (fixtures)

import ratlib.checkpoint  # noqa: E402
from ratlib.synthetic import make_msd_segmentation  # noqa: E402
from ratlib.testing.ranks import run_on_ranks  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "segmentation"
TRAIN_PY = EXAMPLE / "train.py"
CONFIG = EXAMPLE / "config.yaml"

# Shipped config on the synthetic default (8 cases of 64x64x16, 6 for training): foreground Dice per
# class 0.97-0.99 after 10 epochs on 1 rank (120 steps) and on 2 ranks (60 steps), measured
# on a 2-core CPU; untrained 0.0-0.1. The bar leaves margin.
DICE_THRESHOLD = 0.8
UNTRAINED_DICE_MAX = 0.3

TINY = ["data.num_workers=0", "training.log_every=100"]


T = load_script(TRAIN_PY, "segmentation_train")
su = sys.modules["seg_utils"]
CPU = T.DistInfo(0, 1, 0, 1, 0, "single", None, torch.device("cpu"), None, None)  # also on a GPU machine
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # ranks on CPU and gloo, also on a GPU machine


class Interrupted(Exception):
    """Raised by a test right after a checkpoint is saved: the run "dies" there."""


def config(*overrides: str):
    return load_config(CONFIG, overrides=[*TINY, *overrides], schema=T.SegmentationConfig)


def metrics_rows(run_dir: Path | str) -> list[dict]:
    """The epoch rows of metrics.jsonl (the tracker's per-step rows have no "epoch")."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "epoch" in r]


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic default task (what train.py writes with data.root=null)."""
    return make_msd_segmentation(tmp_path_factory.mktemp("msd") / "Task99_Synthetic", 8, (64, 64, 16), 3, seed=0)


# ----------------------------------------------------------------------------------------------
# Config and the ablation runner's contract


def test_contract_and_shipped_config() -> None:
    assert T.EXAMPLE["schema"] is T.SegmentationConfig and issubclass(T.SegmentationConfig, T.ExperimentConfig)
    assert T.EXAMPLE["metric"] == "dice" and T.EXAMPLE["mode"] == "max"
    cfg = load_config(CONFIG, schema=T.EXAMPLE["schema"])
    assert cfg.data.root is None and cfg.model.feature_dims == 8 and cfg.model.num_blocks == 3
    assert su.widths(cfg.model.feature_dims, cfg.model.num_blocks) == [8, 16, 32]
    smoke = config("smoke=true", "data.limit=7")
    assert smoke.data.limit == 7 and smoke.training.max_steps == 10 and smoke.training.num_epochs == 1
    assert config("model.feature_dims=[4,8,16,32]", "model.num_blocks=4").model.feature_dims == [4, 8, 16, 32]
    with pytest.raises(T.UsageError, match="one positive width per level"):
        T.check_settings(config("model.feature_dims=[4,8]"))
    with pytest.raises(T.UsageError, match="low < high"):
        T.check_settings(config("data.window=[250,-175]"))
    with pytest.raises(ConfigError, match="data.limt"):
        config("data.limt=7")


# ----------------------------------------------------------------------------------------------
# Data


def test_task_split_is_by_case_and_deterministic(msd_root: Path) -> None:
    task = su.read_task(msd_root)
    assert task.num_classes == 3 and task.modalities == ["CT"] and len(task.cases) == 8
    train, val = su.split_cases(task.cases, 0.25, seed=0)
    assert len(val) == 2 and not {c.name for c in train} & {c.name for c in val}
    assert su.split_cases(list(reversed(task.cases)), 0.25, seed=0) == (train, val)  # order-independent
    assert any(su.split_cases(task.cases, 0.25, seed=s)[1] != val for s in range(1, 5))


def test_slices_follow_the_canonical_orientation(tmp_path: Path, msd_root: Path) -> None:
    import nibabel as nib

    task = su.read_task(msd_root)
    case = task.cases[0]
    image_npy, label_npy = su.preprocess(case, tmp_path, 3, 1, "window", (-175, 250))
    assert su.preprocess(case, tmp_path, 3, 1, "window", (-175, 250)) == (image_npy, label_npy)  # cached
    ds = su.SliceDataset([(image_npy, label_npy)], train=False)
    raw_label = np.asanyarray(nib.load(case.label).dataobj)
    raw_image = np.asanyarray(nib.load(case.image).dataobj).astype(np.float32)
    # The file's affine runs x and y against RAS: the canonical slices are flipped along both.
    assert nib.aff2axcodes(nib.load(case.image).affine) == ("L", "P", "S")
    z = 8
    image, label, index = ds[z]
    assert index == z and label.dtype == torch.int64 and image.shape == (1, 64, 64)
    assert np.array_equal(label.numpy(), raw_label[::-1, ::-1, z])
    windowed = (np.clip(raw_image[::-1, ::-1, z], -175, 250) + 175) / 425 * 2 - 1
    assert np.allclose(image[0].numpy(), windowed, atol=1e-6)


def test_training_augmentation_depends_on_the_seed_only(msd_root: Path, tmp_path: Path) -> None:
    task = su.read_task(msd_root)
    volumes = [su.preprocess(c, tmp_path, 3, 1, "zscore", (0, 1)) for c in task.cases[:2]]
    ds = su.SliceDataset(volumes, train=True, patch_size=(40, 48), limit=20)
    assert len(ds) == 20 and ds.total == 32
    a, b = ds[(5, 123)], ds[(5, 123)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (1, 40, 48)
    flips = {tuple(ds[(5, s)][1].flatten()[:50].tolist()) for s in range(12)}
    assert len(flips) > 1
    small = su.SliceDataset(volumes, train=True, patch_size=(80, 70))  # larger than the slice: padded
    image, label, _ = small[(0, 7)]
    assert image.shape == (1, 80, 70) and (label == -1).sum() == 80 * 70 - 64 * 64


def test_a_multimodal_task_with_odd_sizes_trains(tmp_path: Path, one_thread) -> None:
    """4D images (two modalities, as BrainTumour and Prostate have), slices of 50 x 38 (padded to
    multiples of 4 for the UNet, the padding left out of loss and Dice)."""
    root = make_msd_segmentation(tmp_path / "Task05_Like", 3, (50, 38, 6), 2, modalities=("T2", "ADC"), name="Prostate")
    metrics = T.train(config(f"data.root={root}", "smoke=true"), run_dir=tmp_path / "run", info=CPU)
    (row,) = metrics_rows(tmp_path / "run")
    assert set(metrics) >= {"dice", "dice_1"} and "dice_2" not in metrics and math.isfinite(row["train/epoch_loss"])
    assert row["train_samples"] == 12 and row["val_samples"] == 6  # 2 train cases and 1 val case of 6 slices
    state = ratlib.checkpoint.load(ratlib.checkpoint.latest(tmp_path / "run" / "checkpoints"))
    assert state["model"]["down.0.0.weight"].shape[1] == 2  # one input channel per modality


def test_pad_collate_pads_to_the_unet_multiple() -> None:
    batch = [
        (torch.ones(2, 30, 17), torch.zeros(30, 17, dtype=torch.int64), 3),
        (torch.ones(2, 25, 20), torch.ones(25, 20, dtype=torch.int64), 9),
    ]
    images, labels, index = su.pad_collate(batch, multiple=8)
    assert images.shape == (2, 2, 32, 24) and labels.shape == (2, 32, 24) and index.tolist() == [3, 9]
    assert (labels[0, 30:] == -1).all() and (labels[1, :25, :20] == 1).all() and images[1, :, 25:].sum() == 0


def test_read_task_errors_name_the_file_and_the_fix(tmp_path: Path, msd_root: Path) -> None:
    with pytest.raises(su.TaskError, match="data.root is the task folder"):
        su.read_task(tmp_path / "nothing")
    with pytest.raises(su.TaskError, match="Task99_Synthetic"):  # the parent of a task: names it
        su.read_task(msd_root.parent)
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((msd_root / "dataset.json").read_text())
    (broken / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(su.TaskError, match=r"lists 16 file\(s\) that do not exist"):
        su.read_task(broken)


# ----------------------------------------------------------------------------------------------
# Sampling: ratlib.data (tests/test_data.py: every slice once, ranks in step, 7 slices on 2 ranks)


# ----------------------------------------------------------------------------------------------
# Model, loss, Dice


def test_unet_widths_levels_and_shape() -> None:
    model = su.UNet(2, 4, su.widths(4, 4))
    assert model.multiple == 8 and len(model.down) == 4
    assert model(torch.randn(3, 2, 40, 24)).shape == (3, 4, 40, 24)
    assert [b[0].out_channels for b in su.UNet(1, 2, [3, 5]).down] == [3, 5]


def test_dice_from_summed_counts_not_an_average_of_per_rank_dice() -> None:
    def logits_for(pred: torch.Tensor, k: int = 3) -> torch.Tensor:
        return torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2).float()

    target = torch.tensor([[[0, 1, 1, 2]], [[0, 1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 0, 2]], [[1, 1, 1, 1]]])
    conf = su.confusion(logits_for(pred), target)
    # class 1: TP 2, FP 3, FN 1 -> 4/8; class 2: TP 1, FN 2 -> 2/4
    assert su.dice_scores(conf) == pytest.approx({"dice": 0.5, "dice_1": 0.5, "dice_2": 0.5})
    per_sample = [
        su.dice_scores(su.confusion(logits_for(pred[i : i + 1]), target[i : i + 1]))["dice_1"] for i in (0, 1)
    ]
    assert per_sample == pytest.approx([2 / 3, 2 / 5])  # their mean (0.53) is not the Dice of the set
    keep = torch.tensor([True, False])  # a padding repeat is left out
    assert torch.equal(su.confusion(logits_for(pred), target, keep), su.confusion(logits_for(pred[:1]), target[:1]))
    padded = target.clone()
    padded[0, 0, 3] = -1  # padding pixels count nowhere
    assert su.confusion(logits_for(pred), padded).sum() == 7
    assert su.dice_scores(np.diag([5, 0, 3]))["dice_1"] == 1.0  # absent and not predicted


def test_confusion_per_sample_is_each_sample_s_confusion() -> None:
    logits = torch.randn(4, 3, 5, 6)
    target = torch.randint(-1, 3, (4, 5, 6))
    per = su.confusion_per_sample(logits, target)
    assert per.shape == (4, 3, 3) and torch.equal(per.sum(0), su.confusion(logits, target))
    for j in range(4):
        assert torch.equal(per[j], su.confusion(logits[j : j + 1], target[j : j + 1]))


def test_loss_prefers_the_truth_and_ignores_padding() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    good = 8 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    bad = good.roll(1, dims=1)
    assert su.dice_ce_loss(good, target) < 0.01 < 1.5 < su.dice_ce_loss(bad, target)
    padded = target.clone()
    padded[:, :, 4:] = -1
    scrambled = good.clone()
    scrambled[:, :, :, 4:] = bad[:, :, :, 4:]
    assert su.dice_ce_loss(scrambled, padded) < 0.01
    only_background = torch.zeros(1, 8, 8, dtype=torch.int64)  # no organ in the batch: CE only
    logits = 8 * torch.nn.functional.one_hot(only_background, 3).permute(0, 3, 1, 2).float()
    assert su.dice_ce_loss(logits, only_background) < 0.01


# ----------------------------------------------------------------------------------------------
# Errors through main()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.root={tmp}/no/Task09_Spleen", "data.root is the task folder"),
        ("model.feature_dims=[4,8]", "one positive width per level"),
        ("training.deepspeed.enabled=true", "pip install 'ratlib[deepspeed]'"),
    ],
)
def test_input_errors_are_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, override: str, expected: str
) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: `import deepspeed` raises
    rc = T.main(["--config", str(CONFIG), f"output_dir={tmp_path / 'run'}", *TINY, override.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err


def test_eval_only_without_a_checkpoint_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = T.main(["--config", str(CONFIG), "--eval-only", f"output_dir={tmp_path / 'run'}", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "no checkpoint under" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"]])
def test_the_deepspeed_launcher_s_local_rank_flag_is_accepted_and_the_environment_wins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    assert parse_args([*flag, "a=1"], "").local_rank == 3
    # One process (no launcher variables): ratlib reads rank 0 from the environment, not local rank 3.
    rc = T.main(["--config", str(CONFIG), "--eval-only", *flag, f"output_dir={tmp_path / 'run'}", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "no checkpoint under" in err and "unrecognized arguments" not in err


def test_the_docs_snippet_imports_the_example_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 item 3: the "Calling it from Python" snippet of docs/examples/segmentation.md runs (here as a
    smoke run)."""
    doc = (EXAMPLE.parents[1] / "docs" / "examples" / "segmentation.md").read_text()
    snippet = doc.split("## Calling it from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "import ratlib" in snippet and "sys.modules" in snippet
    snippet = snippet.replace('"training.max_steps=50"', f'"output_dir={tmp_path}", "smoke=true", *{TINY!r}')
    snippet = snippet.replace('run_dir="runs/a"', f'run_dir="{tmp_path}"')
    monkeypatch.chdir(EXAMPLE.parents[1])
    namespace: dict = {}
    exec(compile(snippet, "segmentation.md", "exec"), namespace)
    assert {"dice", "dice_1", "dice_2"} <= set(namespace["metrics"])


def differing_overrides(run: str) -> int:
    """Each rank started with another training.seed: main() must stop both, naming the key."""
    torch.set_num_threads(1)
    seed = int(os.environ["RANK"])
    return T.main(["--config", str(CONFIG), f"output_dir={run}", *TINY, f"training.seed={seed}"])


@pytest.mark.distributed
def test_ranks_started_with_different_overrides_stop_naming_the_key(tmp_path: Path) -> None:
    result = run_on_ranks(differing_overrides, 2, args=(str(tmp_path / "run"),), env=NO_GPU, timeout=120)
    assert result.returncodes == [2, 2], str(result)
    assert "training.seed" in result.outputs[0] and "Traceback" not in result.outputs[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any work


# ----------------------------------------------------------------------------------------------
# Learning: 1 rank, 2 ranks, evaluation parity


def test_one_rank_learns_past_threshold(tmp_path: Path, msd_root: Path, one_thread) -> None:
    cfg = config(f"data.root={msd_root}")
    task, train_set, val_set = su.build_datasets(cfg, tmp_path)
    torch.manual_seed(0)
    loader = eval_loader(cfg, val_set, CPU, lambda batch: su.pad_collate(batch, multiple=4))
    untrained = T.evaluate(T.build_model(cfg, 1, 3), loader, cfg, CPU)
    metrics = T.train(cfg, run_dir=tmp_path, info=CPU)  # its speed: benchmarks/bench_segmentation.py
    assert untrained["dice"] < UNTRAINED_DICE_MAX, untrained
    assert metrics["dice_1"] >= DICE_THRESHOLD and metrics["dice_2"] >= DICE_THRESHOLD, metrics
    rows = metrics_rows(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(10)) and rows[-1]["step"] == 10 * 12
    assert rows[-1]["dice"] == metrics["dice"] and rows[0]["train/epoch_loss"] > rows[-1]["train/epoch_loss"]
    assert all(r["train_samples"] == r["train_unique_samples"] == 96 for r in rows)
    assert rows[-1]["val_samples"] == rows[-1]["val_unique_samples"] == 32
    for key in ("images_per_s", "peak_memory_gib", "peak_memory_max_gib", "peak_memory_max_rank"):
        assert key in rows[-1], key
    assert (tmp_path / "config.yaml").is_file()
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("*.pt"))] == [
        "epoch0007.pt",
        "epoch0008.pt",
        "epoch0009.pt",
    ]  # checkpoint.keep=3


def two_rank_learning(run: str, root: str) -> int:
    """On each of 2 ranks: train the shipped config; each rank writes what train() returned."""
    from ratlib import distributed, setup_logging

    torch.set_num_threads(1)
    setup_logging(log_dir=Path(run) / "logs")
    with distributed(device="cpu") as info:
        metrics = T.train(config(f"data.root={root}", f"output_dir={run}"), run_dir=run, info=info)
        (Path(run) / f"returned{info.rank}.json").write_text(json.dumps(metrics))
    return 0


@pytest.mark.distributed
def test_two_ranks_learn_and_equal_a_one_rank_evaluation(tmp_path: Path, msd_root: Path, one_thread) -> None:
    run = tmp_path / "run"
    run_on_ranks(two_rank_learning, 2, args=(str(run), str(msd_root)), env=NO_GPU, timeout=240).check()
    rows = metrics_rows(run)
    final = rows[-1]
    assert final["step"] == 10 * 6 and all(r["train_samples"] == r["train_unique_samples"] == 96 for r in rows)
    assert final["dice_1"] >= DICE_THRESHOLD and final["dice_2"] >= DICE_THRESHOLD, final
    assert len(final["peak_memory_gib"]) == 2
    returned = [json.loads((run / f"returned{r}.json").read_text()) for r in range(2)]
    assert returned[0] == returned[1] == {k: final[k] for k in returned[0]}  # the same on every rank
    # The last checkpoint evaluated here on one process: the same Dice, to the last pixel count.
    one = T.evaluate_checkpoint(config(f"data.root={msd_root}"), run_dir=run, info=CPU)
    assert one["val_samples"] == final["val_samples"] == 32
    for key in ("dice", "dice_1", "dice_2"):
        assert one[key] == final[key], key


# ----------------------------------------------------------------------------------------------
# Resume, crash mid-save


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(
    tmp_path: Path, msd_root: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    common = (f"data.root={msd_root}", "training.num_epochs=4", "data.limit=48")
    T.train(config(*common), run_dir=tmp_path / "whole", info=CPU)

    save = RunCheckpoints.save

    def save_then_die(self: RunCheckpoints, *args: Any, **state: Any) -> Path:
        path = save(self, *args, **state)
        if state["epoch"] == 1:
            raise Interrupted(path)
        return path

    monkeypatch.setattr(RunCheckpoints, "save", save_then_die)
    with pytest.raises(Interrupted):
        T.train(config(*common), run_dir=tmp_path / "split", info=CPU)
    monkeypatch.setattr(RunCheckpoints, "save", save)
    torch.manual_seed(1234)  # the resumed run must not depend on the state the process is in
    np.random.seed(1234)
    T.train(config(*common), run_dir=tmp_path / "split", resume=True, info=CPU)

    whole, split = metrics_rows(tmp_path / "whole"), metrics_rows(tmp_path / "split")
    assert [r["epoch"] for r in split] == [0, 1, 2, 3]
    for key in ("step", "train/epoch_loss", "dice", "dice_1", "dice_2"):
        assert [r[key] for r in split] == [r[key] for r in whole], key
    a = ratlib.checkpoint.load(tmp_path / "whole" / "checkpoints" / "epoch0003.pt")
    b = ratlib.checkpoint.load(tmp_path / "split" / "checkpoints" / "epoch0003.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def crash_during_save(run: str, root: str) -> int:
    """One process: train 3 epochs, but die (os._exit) while epoch 1's checkpoint is between its write
    and its rename."""

    def die(tmp: Path) -> None:
        if "epoch0001" in tmp.name:
            os._exit(17)

    torch.set_num_threads(1)
    ratlib.checkpoint.files._before_rename = die
    T.train(config(f"data.root={root}", "training.num_epochs=3", "data.limit=16"), run_dir=run, info=CPU)
    return 0


@pytest.mark.distributed
def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path, msd_root: Path, one_thread) -> None:
    run = tmp_path / "run"
    result = run_on_ranks(crash_during_save, 1, args=(str(run), str(msd_root)), env=NO_GPU, timeout=120)
    assert result.returncodes == [17], str(result)
    folder = run / "checkpoints"
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(ratlib.checkpoint.files.TMP_PREFIX)]
    assert len(leftovers) == 1 and "epoch0001" in leftovers[0]  # the write that never got renamed
    assert ratlib.checkpoint.latest(folder, "epoch*.pt") == folder / "epoch0000.pt"
    state = ratlib.checkpoint.load(folder / "epoch0000.pt")
    assert state["epoch"] == 0 and state["optimizer"] is not None and "rng" in state
    assert [r["epoch"] for r in metrics_rows(run)] == [0, 1]  # epoch 1's row was written, its checkpoint not
    metrics = T.train(
        config(f"data.root={msd_root}", "training.num_epochs=3", "data.limit=16"), run_dir=run, resume=True, info=CPU
    )
    # epoch 1's row (written before the save that died) is dropped on resume: the file reads as one run
    assert [r["epoch"] for r in metrics_rows(run)] == [0, 1, 2] and math.isfinite(metrics["dice"])
    assert ratlib.checkpoint.latest(folder, "epoch*.pt") == folder / "epoch0002.pt"


# ----------------------------------------------------------------------------------------------
# DeepSpeed


NO_DEEPSPEED = 77  # a rank's exit code when deepspeed does not import there


def deepspeed_scenario(run: str, root: str) -> int:
    """On each of 2 ranks: ZeRO-2 on the CPU, 2 epochs of 3 steps uninterrupted; the same interrupted
    after epoch 0 and resumed. Rank 0 writes both loss curves."""
    from ratlib import distributed, setup_logging

    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install that fails on import
        print(f"NO DEEPSPEED: does not import ({type(exc).__name__}: {exc})", flush=True)
        return NO_DEEPSPEED
    torch.set_num_threads(1)
    setup_logging(log_dir=Path(run) / "logs")
    common = (
        f"data.root={root}",
        "training.deepspeed.enabled=true",
        "training.deepspeed.zero_stage=2",
        "training.num_epochs=2",
        "data.limit=48",
    )
    save = RunCheckpoints.save

    def save_then_die(self: RunCheckpoints, *args: Any, **state: Any) -> Path:
        save(self, *args, **state)
        raise Interrupted(state["epoch"])

    with distributed(device="cpu") as info:
        T.train(config(*common), run_dir=Path(run) / "whole", info=info)
        RunCheckpoints.save = save_then_die  # type: ignore[method-assign]
        try:
            T.train(config(*common), run_dir=Path(run) / "split", info=info)
        except Interrupted:
            pass
        finally:
            RunCheckpoints.save = save  # type: ignore[method-assign]
        T.train(config(*common), run_dir=Path(run) / "split", resume=True, info=info)
    return 0


@pytest.mark.distributed
def test_deepspeed_zero2_on_two_cpu_ranks_saves_and_resumes(tmp_path: Path, msd_root: Path, one_thread) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        unavailable("deepspeed", "is not installed")
    run = tmp_path / "run"
    result = run_on_ranks(
        deepspeed_scenario, 2, args=(str(run), str(msd_root)), env={**NO_GPU, "DS_ACCELERATOR": "cpu"}, timeout=300
    )
    if NO_DEEPSPEED in result.returncodes:  # imported in the ranks only: it is slow and prints a lot
        said = [ln for out in result.outputs for ln in out.splitlines() if ln.startswith("NO DEEPSPEED: ")]
        unavailable("deepspeed", said[0] if said else "does not import in a rank")
    result.check()
    whole, split = metrics_rows(run / "whole"), metrics_rows(run / "split")
    assert [r["step"] for r in whole] == [r["step"] for r in split] == [3, 6]
    assert all(
        math.isfinite(r["train/epoch_loss"]) and r["train_samples"] == r["train_unique_samples"] == 48 for r in split
    )
    assert [r["train/epoch_loss"] for r in split] == pytest.approx([r["train/epoch_loss"] for r in whole], rel=1e-6)
    tags = sorted(p.name for p in (run / "split" / "checkpoints" / "deepspeed").iterdir() if p.is_dir())
    assert tags == ["epoch0000", "epoch0001"]
    assert ratlib.checkpoint.load(run / "split" / "checkpoints" / "epoch0001.pt")["step"] == 6
    for path in (run / "split" / "checkpoints").glob("*.pt"):  # plain data (issue 25)
        assert torch.load(path, map_location="cpu", weights_only=True)["optimizer"] is None


# ----------------------------------------------------------------------------------------------
# Smoke mode, data.limit, per-rank memory


@pytest.mark.distributed
def test_smoke_on_two_ranks_finishes_in_seconds(tmp_path: Path, msd_root: Path, one_thread) -> None:
    run = tmp_path / "run"
    run_on_ranks(
        TRAIN_PY,
        2,
        args=["--config", str(CONFIG), f"output_dir={run}", f"data.root={msd_root}", "smoke=true", *TINY],
        env=NO_GPU,
        timeout=120,
    ).check()
    (row,) = metrics_rows(run)
    # "in seconds" is the work done: one epoch of one step on 16 slices (no wall-clock bound on a shared box)
    assert row["train_samples"] == row["train_unique_samples"] == 16 and row["step"] == 1  # 16 / (8 x 2)
    assert row["val_samples"] == 16 and math.isfinite(row["train/epoch_loss"]) and math.isfinite(row["dice"])
    assert row["peak_memory_kind"] == "rss" and len(row["peak_memory_gib"]) == 2
    assert row["peak_memory_max_gib"] == max(row["peak_memory_gib"]) and row["peak_memory_max_rank"] in (0, 1)
    assert ratlib.checkpoint.latest(run / "checkpoints") == run / "checkpoints" / "epoch0000.pt"


def limit_seven(run: str, root: str) -> int:
    from ratlib import distributed

    torch.set_num_threads(1)
    with distributed(device="cpu") as info:
        T.train(config(f"data.root={root}", "data.limit=7", "training.num_epochs=2"), run_dir=run, info=info)
    return 0


@pytest.mark.distributed
def test_limit_seven_trains_on_exactly_seven_slices_across_two_ranks(
    tmp_path: Path, msd_root: Path, one_thread
) -> None:
    run = tmp_path / "run"
    run_on_ranks(limit_seven, 2, args=(str(run), str(msd_root)), env=NO_GPU, timeout=120).check()
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2]  # 7 slices, batch 8 on 2 ranks (4 + 3): one step per epoch
    assert all(r["train_samples"] == r["train_unique_samples"] == 7 for r in rows)
    # 7 validation slices on 2 ranks: DistributedSampler pads rank 1 with a repeat, left out of Dice.
    assert all(r["val_samples"] == r["val_unique_samples"] == 7 for r in rows)
    one = T.evaluate_checkpoint(config(f"data.root={msd_root}", "data.limit=7"), run_dir=run, info=CPU)
    assert one["val_samples"] == 7 and all(one[k] == rows[-1][k] for k in ("dice", "dice_1", "dice_2"))


@pytest.mark.parametrize("empty_slices", [1.0, 0.3])
def test_limit_reads_only_the_cases_it_needs_and_picks_the_same_slices(
    msd_root: Path, tmp_path: Path, empty_slices: float
) -> None:
    # A smoke run on a real task must not preprocess every volume: with data.limit the cases after the first
    # `limit` slices are never read. The slices are those the full read would have picked.
    task = su.read_task(msd_root)
    read: list[str] = []

    def prep(case):
        read.append(case.name)
        return su.preprocess(case, tmp_path, task.num_classes, len(task.modalities), "zscore", (0, 1))

    def make(limit):
        return lambda vols: su.SliceDataset(vols, train=True, limit=limit, empty_slices=empty_slices, seed=3)

    depth = 16  # slices per synthetic volume (msd_root's shape)
    limited, n = su.limited_dataset(task.cases, prep, depth + 3, make(depth + 3))
    assert len(limited) == depth + 3 and n == len(set(read)) < len(task.cases)
    full, n_all = su.limited_dataset(task.cases, prep, None, make(depth + 3))
    assert n_all == len(task.cases) and limited.index == full.index
    for i in (0, len(full) - 1):
        assert torch.equal(limited[i][0], full[i][0]) and torch.equal(limited[i][1], full[i][1])


# ----------------------------------------------------------------------------------------------
# Preemption (issue 22), tracking (issue 21), plain-data checkpoints (issue 25), the size rule


PREEMPT = ("data.limit=48", "training.num_epochs=2", "training.log_every=1")  # 2 ranks: 3 steps per epoch


def preempt_run(run: str, root: str, signal_at: int, resume: bool) -> int:
    """One rank of a 2-rank run; rank 1 sends itself SIGTERM when step ``signal_at`` is done (0: never)."""
    from ratlib import distributed

    torch.set_num_threads(1)
    signal_rank_1_after(T, signal_at)
    with distributed(device="cpu") as info:
        T.train(config(f"data.root={root}", *PREEMPT), run_dir=run, resume=resume, info=info)
    return 0


def weights_only(path: Path) -> dict:
    """What a colleague's plain ``torch.load`` gets: only plain data loads (issue 25)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_rank_1_mid_epoch_then_resume_gives_the_same_weights_bit_for_bit(
    tmp_path: Path, msd_root: Path, one_thread
) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_on_ranks(preempt_run, 2, args=(str(whole), str(msd_root), 0, False), env=NO_GPU, timeout=300).check()
    stopped = run_on_ranks(preempt_run, 2, args=(str(split), str(msd_root), 4, False), env=NO_GPU, timeout=300)
    assert stopped.returncodes == [75, 75], str(stopped)  # both ranks stopped, at one step (PREEMPT_EXIT_CODE)
    assert all("rank 1 got SIGTERM" in out for out in stopped.outputs), stopped.outputs[0][-2000:]
    mid = weights_only(split / "checkpoints" / "epoch0001.pt")  # the stop checkpoint: mid-epoch 1
    assert 0 < mid["sampler"]["position"] < 3 and mid["step"] == 3 + mid["sampler"]["position"], mid["sampler"]
    assert mid["rng"]["world_size"] == 2 and mid["tracker"]["step"] == mid["step"]
    assert mid["optimizer"] is not None and mid["scheduler"] is not None
    run_on_ranks(preempt_run, 2, args=(str(split), str(msd_root), 0, True), env=NO_GPU, timeout=300).check()

    a, b = weights_only(whole / "checkpoints" / "epoch0001.pt"), weights_only(split / "checkpoints" / "epoch0001.pt")
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    assert all(
        torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values())
    )
    # metrics.jsonl: every step once, the same rows as the uninterrupted run
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 7)), steps
    assert [r["epoch"] for r in rows if "epoch" in r] == [0, 1]
    whole_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == [
        r["train/loss"] for r in whole_rows if "train/loss" in r
    ]
    # TensorBoard: one run folder (rank 0's), each step of train/loss once
    events = sorted(split.glob("events.out.tfevents.*"))
    assert events and not list((split / "logs").glob("events*"))
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(split))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
        assert "peak_memory_max_gib" in acc.Tags()["scalars"]


def test_every_checkpoint_loads_with_weights_only(tmp_path: Path, msd_root: Path, one_thread) -> None:
    T.train(config(f"data.root={msd_root}", "data.limit=16", "training.num_epochs=1"), run_dir=tmp_path, info=CPU)
    state = weights_only(tmp_path / "checkpoints" / "epoch0000.pt")
    assert {"model", "optimizer", "scheduler", "sampler", "rng", "tracker", "config"} <= state.keys()
    assert T.evaluate_checkpoint(config(f"data.root={msd_root}", "data.limit=16"), run_dir=tmp_path, info=CPU)


def test_each_metric_is_logged_once_per_step_under_one_name(tmp_path: Path, msd_root: Path, one_thread) -> None:
    """3 epochs of 6 steps with a step line every 3 steps: the epoch's figures and the step lines meet at steps
    6, 12 and 18, and still no TensorBoard tag (and no metrics.jsonl key) has a step twice."""
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(f"data.root={msd_root}", "data.limit=48", "training.num_epochs=3", "training.log_every=3")
    T.train(cfg, run_dir=tmp_path, info=CPU)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "lr", "train/epoch_loss", "dice", "peak_memory_max_gib"} <= set(tags), tags
    for tag in tags:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
    assert [e.step for e in acc.Scalars("lr")] == [3, 6, 9, 12, 15, 18]
    seen: dict[str, list[int]] = {}
    for row in (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()):
        for key in row.keys() - {"step", "epoch"}:
            seen.setdefault(key, []).append(row["step"])
    assert all(len(steps) == len(set(steps)) for steps in seen.values()), seen


def test_tracking_without_tensorboard_is_one_info_line(
    tmp_path: Path, msd_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, one_thread
) -> None:
    import ratlib.tracking

    monkeypatch.setattr(ratlib.tracking.backends, "_installed", lambda name: name != "tensorboard")
    with caplog.at_level("INFO"):
        T.train(config(f"data.root={msd_root}", "data.limit=16", "training.num_epochs=1"), run_dir=tmp_path, info=CPU)
    hints = [r for r in caplog.records if "tensorboard" in r.getMessage() and "pip install" in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelname == "INFO", [r.getMessage() for r in hints]
    assert not list(tmp_path.glob("events.out.tfevents.*")) and metrics_rows(tmp_path)[0]["epoch"] == 0


def test_a_big_model_gets_the_example_s_size_warning() -> None:
    from ratlib.config_defaults import check_config

    big, checks = config("model.feature_dims=1024"), T.EXAMPLE["checks"]
    found = [f for f in check_config(big, 1, device="cpu", checks=checks) if f.key == "model"]
    assert len(found) == 1 and found[0].severity == "warning" and "DeepSpeed" in found[0].advice
    assert not [f for f in check_config(config(), 1, device="cpu", checks=checks) if f.key == "model"]
    assert not [f for f in check_config(big, 1, device="cpu") if f.key == "model"]  # not registered at import


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_restart_after_kill_9_resumes_from_the_latest_checkpoint_by_itself(
    tmp_path: Path, msd_root: Path
) -> None:
    """torchrun --max-restarts 1; one worker killed with SIGKILL mid-epoch 1 (after epoch 0's checkpoint):
    the restarted workers take the latest checkpoint (training.resume=auto) and finish, nothing logged twice."""
    import signal
    import subprocess
    import time

    import psutil

    run = tmp_path / "run"
    args = [f"output_dir={run}", f"data.root={msd_root}", "data.limit=48", "training.num_epochs=3"]
    args += [*TINY, "training.log_every=1", "training.resume=auto"]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    cmd += ["--max-restarts", "1", str(TRAIN_PY), "--config", str(CONFIG), *args]
    env = {**os.environ, **NO_GPU, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and time.monotonic() < deadline and agent.poll() is None:
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
            steps = [json.loads(x)["step"] for x in lines[:-1]]  # the last line may be half written
            if (run / "checkpoints" / "epoch0000.pt").is_file() and max(steps, default=0) >= 4:
                workers = [p for p in psutil.Process(agent.pid).children() if "train.py" in " ".join(p.cmdline())]
                for worker in workers:
                    if worker.environ().get("RANK") == "1":
                        worker.send_signal(signal.SIGKILL)
                        killed = worker.pid
            time.sleep(0.2)
        out, _ = agent.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if agent.poll() is None:
            agent.kill()
    assert killed is not None, "the run ended before a worker could be killed mid-epoch"
    assert agent.returncode == 0, out[-4000:]
    assert "resumed from" in out and "epoch 0 done" in out, out[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 10))  # each step once
    assert [r["epoch"] for r in rows if "epoch" in r] == [0, 1, 2]
    assert weights_only(run / "checkpoints" / "epoch0002.pt")["step"] == 9


GLOBAL = ("training.global_batch_size=16", "training.batch_size=8", "model.norm=instance")  # 3 steps an epoch


def signal_a_rank_after(step: int) -> None:
    """Like ``signal_rank_1_after``, also on one rank: rank 1 (or rank 0 when it is alone) sends itself SIGTERM
    once ``step`` is done (0: never)."""
    import signal

    beat = T.heartbeat
    target = min(1, int(os.environ["WORLD_SIZE"]) - 1)

    def heartbeat(done: int) -> None:
        beat(done)
        if done == step and int(os.environ["RANK"]) == target:
            os.kill(os.getpid(), signal.SIGTERM)

    T.heartbeat = heartbeat


DRAWN: list[int] = []  # (epoch, global step) of the micro-batch the sampler handed out last


def log_global_batches(run: str, launch: int) -> None:
    """Every micro-batch this rank's training sampler draws, with its epoch and global step, appended to
    ``run/batches{rank}.{launch}.jsonl`` for the test (what ``global_batches`` reads)."""
    from ratlib.data import ShardedBatchSampler

    iterate = ShardedBatchSampler.__iter__

    def logged(self):
        with open(Path(run) / f"batches{self.rank}.{launch}.jsonl", "a") as f:
            for batch in iterate(self):
                step = (self.position - 1) // self.accumulation_steps
                DRAWN[:] = [self.epoch, step]
                f.write(json.dumps([self.epoch, step, [i for i, _ in batch]]) + "\n")
                f.flush()
                yield batch

    ShardedBatchSampler.__iter__ = logged


def global_batch_run(run: str, root: str, signal_at: int, resume: bool, *overrides: str) -> int:
    """One rank of a run on global batches of 16 (instance norm: nothing depends on how a batch is split);
    rank 1 (rank 0 when alone) sends itself SIGTERM when step ``signal_at`` is done (0: never)."""
    from ratlib import distributed

    torch.set_num_threads(1)
    signal_a_rank_after(signal_at)
    log_global_batches(run, int(resume))
    with distributed(device="cpu") as info:
        T.train(config(f"data.root={root}", *PREEMPT, *GLOBAL, *overrides), run_dir=run, resume=resume, info=info)
    return 0


def global_batches(run: Path, launch: int) -> dict[tuple[int, int], list[int]]:
    """(epoch, step) -> the sorted indices of that global step, from every rank's logged micro-batches of one
    launch (0: the first, 1: the resume)."""
    out: dict[tuple[int, int], list[int]] = {}
    for path in sorted(run.glob(f"batches*.{launch}.jsonl")):
        for line in path.read_text().splitlines():
            epoch, step, indices = json.loads(line)
            out.setdefault((epoch, step), []).extend(indices)
    return {k: sorted(v) for k, v in sorted(out.items())}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (3, 2), (1, 2)])
def test_a_run_stopped_on_n_ranks_resumes_on_m_with_the_same_global_batches(
    tmp_path: Path, msd_root: Path, one_thread, before: int, after: int
) -> None:
    """training.global_batch_size: SIGTERM to rank 1 (rank 0 alone) after step 1 of 6 on N ranks, then --resume on
    M: 1 rank (micro-batches of 8, 2 a step), 2 (8 each), 3 (parts of 6/5/5). The same samples each step, so the
    loss curve and the learning rates are the uninterrupted N-rank run's. (The weights are close but not equal:
    the example's soft Dice is computed per micro-batch, and another number of ranks splits a global batch
    differently; with a loss that is a mean over samples the resume is exact to rounding, tests/test_data.py
    shows it in float64.)"""
    whole, split = tmp_path / "whole", tmp_path / "split"

    def go(ranks: int, args: tuple):
        return run_on_ranks(global_batch_run, ranks, args=args, env=NO_GPU, timeout=300)

    go(before, args=(str(whole), str(msd_root), 0, False)).check()
    stopped = go(before, args=(str(split), str(msd_root), 1, False))
    assert stopped.returncodes == [75] * before, str(stopped)
    mid = weights_only(split / "checkpoints" / "epoch0000.pt")  # the stop: mid-epoch 0, the job's position
    assert mid["sampler"]["global_position"] == mid["step"] in (1, 2) and mid["sampler"]["world_size"] == before
    go(after, args=(str(split), str(msd_root), 0, True)).check()
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))  # every step once
    # the schedule counts global steps: the same learning rate at every step
    assert [r["lr"] for r in rows if "train/loss" in r] == [w["lr"] for w in whole_rows if "train/loss" in w]
    # (train/loss is the main rank's last micro-batch, which holds other samples on another number of ranks)
    epochs = {r["epoch"]: r for r in rows if "epoch" in r}
    assert epochs[1]["train_samples"] == epochs[1]["train_unique_samples"] == 48  # the whole epoch, each once
    # the global batches, index by index: the stopped run's steps, then the resumed run's, are the whole run's
    first, second = global_batches(split, 0), global_batches(split, 1)
    assert not first.keys() & second.keys() and max(first) == (0, mid["step"] - 1), (list(first), list(second))
    assert {**first, **second} == global_batches(whole, 0)
    assert len(list(split.glob("batches*.1.jsonl"))) == after
    b = weights_only(split / "checkpoints" / "epoch0001.pt")
    assert b["step"] == 6 and b["sampler"]["world_size"] == after


# float64 and a loss that is a mean over samples: the resume on another number of ranks is exact to rounding
# (training.numerics stays on: its gradient check takes float64 gradients too)
FLOAT64 = ("model.loss=ce",)


def float64_run(run: str, root: str, signal_at: int, resume: bool, *overrides: str) -> int:
    """``global_batch_run`` in float64 (``torch.set_default_dtype``: the model, the inputs and the loss), which also
    writes every micro-batch's weighted loss, ``loss * weight / world_size``: summed over a step's micro-batches
    of every rank, the global step's mean loss over its samples."""
    torch.set_default_dtype(torch.float64)
    backward = Stepper.backward

    def logged(self, loss, weight=None):
        if weight is not None:
            world = int(os.environ["WORLD_SIZE"])
            with open(Path(run) / f"losses{os.environ['RANK']}.{int(resume)}.jsonl", "a") as f:
                f.write(json.dumps([*DRAWN, float(loss) * weight / world]) + "\n")
        return backward(self, loss, weight)

    Stepper.backward = logged  # type: ignore[method-assign]
    return global_batch_run(run, root, signal_at, resume, *(overrides or FLOAT64))


def step_losses(run: Path, launch: int) -> dict[tuple[int, int], float]:
    """(epoch, step) -> the global step's loss, from every rank's weighted micro-batch losses of one launch."""
    out: dict[tuple[int, int], float] = {}
    for path in sorted(run.glob(f"losses*.{launch}.jsonl")):
        for line in path.read_text().splitlines():
            epoch, step, value = json.loads(line)
            out[(epoch, step)] = out.get((epoch, step), 0.0) + value
    return dict(sorted(out.items()))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3)])
def test_in_float64_a_run_resumed_on_m_ranks_has_the_uninterrupted_losses_and_weights_within_1e9(
    tmp_path: Path, msd_root: Path, one_thread, before: int, after: int
) -> None:
    """The issue's exactness figure on the example: float64, instance norm (per sample), cross-entropy only,
    global batches of 16; stopped after step 1 on N ranks, resumed on M. Every step's global loss after the
    resume and the final weights match the uninterrupted N-rank run within 1e-9 relative (the all-reduce order
    differs with M, so not bit for bit; measured: the losses within 2.5e-16, the weights within 3.1e-15)."""
    whole, split = tmp_path / "whole", tmp_path / "split"

    def go(ranks: int, args: tuple):
        return run_on_ranks(float64_run, ranks, args=args, env=NO_GPU, timeout=300)

    go(before, args=(str(whole), str(msd_root), 0, False)).check()
    stopped = go(before, args=(str(split), str(msd_root), 1, False))
    assert stopped.returncodes == [75] * before, str(stopped)
    go(after, args=(str(split), str(msd_root), 0, True)).check()
    reference, resumed = step_losses(whole, 0), step_losses(split, 1)
    assert len(reference) == 6 and min(resumed) in ((0, 1), (0, 2)) and max(resumed) == (1, 2), list(resumed)
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-9), step
    a = weights_only(whole / "checkpoints" / "epoch0001.pt")["model"]
    b = weights_only(split / "checkpoints" / "epoch0001.pt")["model"]
    assert all(a[k].dtype == torch.float64 for k in a if a[k].is_floating_point())
    worst = max(float(((a[k] - b[k]).abs() / a[k].abs().clamp(min=1e-3)).max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-9, worst

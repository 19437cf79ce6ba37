"""examples/detection: data, sampling, distributed COCO evaluation, learning, 2 ranks, resume, errors.

The learning tests train ``fasterrcnn_tiny`` (about 1M parameters, 128 px images) on the synthetic
shapes; thresholds were set from repeated CPU runs (see ``AP50_THRESHOLD``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from example_helpers import _restore_logging, load_script, one_thread, signal_rank_1_after  # noqa: F401  (fixtures)
from hypothesis import given, settings
from hypothesis import strategies as st
from suite_rules import require

from ratlib.checkpoint import RunCheckpoints
from ratlib.config_defaults import ConfigError, load_config, parse_args
from ratlib.data import EvalSampler, ShardedBatchSampler
from ratlib.strategy import eval_loader
from ratlib.synthetic import make_coco_detection
from ratlib.testing.ranks import run_on_ranks
from ratlib.testing.strategies import coco_split_spellings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detection"
TRAIN_PY = EXAMPLE / "train.py"

# fasterrcnn_tiny, 32 synthetic train images, batch 4, AdamW lr 2e-3, 40 steps, seed 0: AP50 0.75-0.85
# measured on 1 CPU thread (untrained: 0.00); on 2 ranks (global batch 8) 0.9+. The bar leaves margin.
AP50_THRESHOLD = 0.5
UNTRAINED_AP50_MAX = 0.05

TINY = [
    "model.name=fasterrcnn_tiny",
    "model.min_size=128",
    "model.max_size=128",
    "training.batch_size=4",
    "training.mixed_precision=false",
    "training.optimizer.lr=2e-3",
    "training.optimizer.weight_decay=1e-4",
    "training.scheduler.warmup_epochs=0.5",
    "training.scheduler.min_lr=1e-5",
    "training.log_every=10",
    "data.num_workers=0",
    "eval.every_epochs=100",
]


T = load_script(TRAIN_PY, "detection_train")
du = sys.modules["detection_utils"]
CPU = T.DistInfo(0, 1, 0, 1, 0, "single", None, torch.device("cpu"), None, None)  # also on a GPU machine
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # ranks on CPU and gloo, also on a GPU machine


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 train and 16 val images of shapes, COCO layout."""
    root = tmp_path_factory.mktemp("coco")
    make_coco_detection(root, "train2017", num_images=32, seed=0)
    make_coco_detection(root, "val2017", num_images=16, seed=0)
    return root


def config(*overrides: str):
    return load_config(None, overrides=[*TINY, *overrides], schema=T.DetectionConfig)


def metrics_rows(run_dir: Path) -> list[dict]:
    """The epoch rows of metrics.jsonl (the tracker's per-step rows have no "epoch")."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "epoch" in r]


# ----------------------------------------------------------------------------------------------
# Dataset


def _with_edits(src_root: Path, dst: Path, edit) -> Path:
    """A copy of the val split whose annotation JSON ``edit`` changed."""
    shutil.copytree(src_root / "val2017", dst / "val2017")
    data = json.loads((src_root / "annotations" / "instances_val2017.json").read_text())
    edit(data)
    (dst / "annotations").mkdir(parents=True)
    (dst / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return dst


def test_dataset_targets_crowd_degenerate_empty_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = make_coco_detection(tmp_path, "train2017", num_images=12, seed=3, empty_images=2, crowd_fraction=0.3)
    data = json.loads(paths.annotations.read_text())
    assert any(a["iscrowd"] for a in data["annotations"])
    victim = next(a for a in data["annotations"] if not a["iscrowd"])
    victim["bbox"][2] = 0.0  # degenerate: no width
    paths.annotations.write_text(json.dumps(data))
    caplog.set_level("INFO")
    ds = du.CocoDetection(paths.images, paths.annotations, train=True, transforms=du.make_transforms(False))
    text = caplog.text
    assert "dropped 1 degenerate boxes" in text and str(victim["id"]) in text
    assert "crowd boxes skipped" in text
    usable_images = {a["image_id"] for a in data["annotations"] if not a["iscrowd"] and a["id"] != victim["id"]}
    left_out = 12 - len(usable_images)
    assert left_out >= 2  # the 2 empty images, and those with crowd regions only
    assert f"{left_out} images without usable boxes left out of training" in text
    assert len(ds) == len(usable_images) and set(ds.ids) == usable_images
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128) and 0 <= image.min() and image.max() <= 1
    boxes = target["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all()
    assert target["labels"].min() >= 1 and target["labels"].max() <= 3
    usable = [
        a
        for a in data["annotations"]
        if a["image_id"] == target["image_id"] and not a["iscrowd"] and a["id"] != victim["id"]
    ]
    assert len(boxes) == len(usable)

    keep = du.CocoDetection(paths.images, paths.annotations, train=True, keep_empty=True)
    assert len(keep) == 12
    val = du.CocoDetection(paths.images, paths.annotations, train=False, limit=5)
    assert val.ids == sorted(im["id"] for im in data["images"])[:5]  # first N, deterministic


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools and numpy 2
def test_dataset_maps_category_ids_and_masks(tmp_path: Path, coco_root: Path) -> None:
    ids = {1: 7, 2: 3, 3: 42}

    def remap(data: dict) -> None:
        for c in data["categories"]:
            c["id"] = ids[c["id"]]
        for a in data["annotations"]:
            a["category_id"] = ids[a["category_id"]]

    root = _with_edits(coco_root, tmp_path, remap)
    ds = du.CocoDetection(
        root / "val2017",
        root / "annotations" / "instances_val2017.json",
        train=True,
        masks=True,
        transforms=du.make_transforms(False),
    )
    assert ds.label_to_cat == [0, 3, 7, 42] and ds.num_classes == 4
    _, target = ds[0]
    anns = ds.coco.imgToAnns[target["image_id"]]
    assert sorted(ds.label_to_cat[int(lbl)] for lbl in target["labels"]) == sorted(a["category_id"] for a in anns)
    assert target["masks"].shape == (len(anns), 128, 128) and target["masks"].sum() > 0


def test_shipped_config_loads_and_names_a_model() -> None:
    cfg = load_config(EXAMPLE / "config.yaml", schema=T.DetectionConfig)
    assert cfg.model.name in du.model_names() and cfg.data.root is None
    assert T.DetectionConfig().model.name == "fasterrcnn_mobilenet_v3_large_fpn"  # the default without a config
    assert T.EXAMPLE == {"schema": T.DetectionConfig, "metric": "map", "mode": "max", "checks": ()}


def test_limit_and_keep_empty_in_config() -> None:
    cfg = config("data.limit=7", "smoke=true")
    assert cfg.data.limit == 7 and cfg.training.max_steps == 10 and cfg.training.num_epochs == 1
    with pytest.raises(ConfigError, match="data.limt"):
        config("data.limt=7")


# ----------------------------------------------------------------------------------------------
# Sampling


def test_sampler_shuffles_per_epoch_and_limit_seven_on_two_ranks() -> None:
    """The aspect-grouped sampling train() uses (ratlib.data; its properties: tests/test_data.py)."""
    s0, s1 = (ShardedBatchSampler(7, 2, rank=r, world_size=2, group_ids=[0] * 7) for r in range(2))
    epoch0 = [list(s0), list(s1)]
    assert sorted(i for b in epoch0 for x in b for i in x) == list(range(7))
    assert [len(x) for x in epoch0[0]] == [2, 2] and sorted(len(x) for x in epoch0[1]) == [1, 2]
    s0.set_epoch(1)
    assert list(s0) != epoch0[0]
    assert list(EvalSampler(7, rank=0, world_size=2)) + list(EvalSampler(7, rank=1, world_size=2)) == [
        0,
        2,
        4,
        6,
        1,
        3,
        5,
    ]


# ----------------------------------------------------------------------------------------------
# Evaluation path


class Oracle(torch.nn.Module):
    """Returns the ground truth of each image the loader yields, in order (score 1), optionally with
    every label shifted to the next class."""

    def __init__(self, ds, order: list[int], shift: int = 0) -> None:
        super().__init__()
        self.targets = [ds.targets[ds.ids[i]] for i in order]
        self.k, self.shift, self.pos = ds.num_classes - 1, shift, 0

    def forward(self, images):
        out = []
        for _ in images:
            boxes, labels, _ = self.targets[self.pos]
            self.pos += 1
            labels = [(lbl - 1 + self.shift) % self.k + 1 for lbl in labels]
            out.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "scores": torch.ones(len(labels)),
                }
            )
        return out


def _evaluate_oracle(ds, shift: int = 0) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=du.collate)
    metrics = du.evaluate(
        Oracle(ds, list(range(len(ds))), shift), loader, ds, torch.device("cpu"), backend="pycocotools"
    )
    assert metrics is not None and metrics["eval_images"] == len(ds)
    return metrics


def test_ground_truth_as_predictions_scores_one_and_shuffled_labels_low(tmp_path: Path, coco_root: Path) -> None:
    ids = {1: 7, 2: 3, 3: 42}  # category ids that are not 1..K: the mapping back is exercised

    def remap(data: dict) -> None:
        for c in data["categories"]:
            c["id"] = ids[c["id"]]
        for a in data["annotations"]:
            a["category_id"] = ids[a["category_id"]]

    root = _with_edits(coco_root, tmp_path, remap)
    ds = du.CocoDetection(
        root / "val2017",
        root / "annotations" / "instances_val2017.json",
        train=False,
        transforms=du.make_transforms(False),
    )
    perfect = _evaluate_oracle(ds)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert perfect["mar_100"] == pytest.approx(1.0)
    wrong = _evaluate_oracle(ds, shift=1)
    assert wrong["map50"] < 0.05


def test_coco_results_rows() -> None:
    out = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([2]),
    }
    rows = du.to_coco_results([out], [9], [0, 7, 42])
    assert rows.tolist() == [[9.0, 10.0, 20.0, 20.0, 40.0, 0.5, 42.0]]  # xywh, category id 42
    # An image predicted twice or by no rank is a CoverageError of gather_by_index (tests/test_data.py).


def test_empty_predictions_score_zero(coco_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = du.CocoDetection(coco_root / "val2017", coco_root / "annotations" / "instances_val2017.json", train=False)
    metrics, summary = du.coco_eval(ds.coco, np.zeros((0, 7)), ds.ids, backend="pycocotools")
    assert metrics["map"] == 0.0 and "Average Precision" in summary
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # blocked: import raises, installed or not
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        du.coco_eval(ds.coco, np.zeros((0, 7)), ds.ids, backend="faster_coco_eval")
    _, auto_summary = du.coco_eval(ds.coco, np.zeros((0, 7)), ds.ids, backend="auto")  # falls back to pycocotools
    assert "Average Precision" in auto_summary


def test_faster_coco_eval_agrees_with_pycocotools(coco_root: Path) -> None:
    require("faster_coco_eval")
    ds = du.CocoDetection(coco_root / "val2017", coco_root / "annotations" / "instances_val2017.json", train=False)
    rng = np.random.default_rng(0)
    rows = np.array(
        [
            [a["image_id"], *(np.array(a["bbox"]) + rng.normal(0, 2, 4)), rng.random(), a["category_id"]]
            for a in ds.coco.dataset["annotations"]
        ]
    )
    a, _ = du.coco_eval(ds.coco, rows, ds.ids, backend="pycocotools")
    b, _ = du.coco_eval(ds.coco, rows, ds.ids, backend="faster_coco_eval")
    assert a == pytest.approx(b, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Paths and errors


@pytest.fixture(scope="module")
def spelling_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict[int, int]]]:
    """Per layout (coco, roboflow, detectron2): a root with 6 train images (the first one empty, some
    objects crowd regions) and 4 val images, its train annotation file, and per train image with a usable
    (non-crowd) box the number of such boxes, counted from the JSON."""
    roots = {}
    for layout in ("coco", "roboflow", "detectron2"):
        root = tmp_path_factory.mktemp(f"spellings-{layout}")
        paths = make_coco_detection(
            root, "train2017", num_images=6, layout=layout, seed=1, empty_images=1, crowd_fraction=0.3
        )
        make_coco_detection(root, "val2017", num_images=4, layout=layout, seed=1)
        data = json.loads(paths.annotations.read_text())
        usable: dict[int, int] = {}
        for a in data["annotations"]:
            if not a["iscrowd"]:
                usable[a["image_id"]] = usable.get(a["image_id"], 0) + 1
        assert 0 < len(usable) < 6  # the empty image is left out: the count checked is not just "all of them"
        roots[layout] = (root, paths.annotations, usable)
    return roots


@settings(max_examples=30, deadline=None)
@given(
    spelling=coco_split_spellings(split="train", year=2017), layout=st.sampled_from(["coco", "roboflow", "detectron2"])
)
def test_every_train_split_spelling_resolves_to_the_dataset(
    coco_root: Path, spelling_roots, spelling, layout: str
) -> None:
    """Issue 8: every data.train_split spelling that coco_paths accepts trains. Each spelling resolves to
    the annotation file, and the training set train() builds from it has the expected images, a batch
    of well-formed targets through the sampler and collate train() uses."""
    text, _ = spelling
    cfg = config(f"data.root={coco_root}", f"data.train_split={json.dumps(text)}")
    train_paths, _ = du.resolve_splits(cfg, coco_root)
    assert train_paths.annotations == coco_root / "annotations" / "instances_train2017.json"

    root, annotations, usable = spelling_roots[layout]
    cfg = config(f"data.root={root}", f"data.train_split={json.dumps(text)}", "data.val_split=val")
    assert du.resolve_splits(cfg, root)[0].annotations == annotations
    train_set, val_set = du.build_datasets(cfg, root, masks=False)  # as train() builds them
    assert len(train_set) == len(usable) and sorted(train_set.ids) == sorted(usable)
    assert len(val_set) == 4 and train_set.num_classes == 4
    groups = train_set.aspect_groups()
    sampler = ShardedBatchSampler(len(groups), 2, rank=0, world_size=1, seed=0, group_ids=groups)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=du.collate)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) >= 1
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert 0 <= image.min() and image.max() <= 1
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape == (usable[int(target["image_id"])], 4)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 128).all()
        assert labels.dtype == torch.int64 and labels.shape == (len(boxes),)
        assert labels.min() >= 1 and labels.max() < train_set.num_classes


@pytest.mark.slow
@pytest.mark.parametrize("layout,spelling", [("coco", "2017_train"), ("roboflow", "train/_annotations.coco.json")])
def test_a_spelling_trains_end_to_end(tmp_path: Path, layout: str, spelling: str, one_thread) -> None:
    root = tmp_path / "data"
    make_coco_detection(root, "train2017", num_images=6, layout=layout)
    make_coco_detection(root, "val2017", num_images=4, layout=layout)
    rc = T.main(
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.root={root}",
            f"data.train_split={spelling}",
            "data.val_split=valid",
            "training.max_steps=1",
            "model.width=8",
            *TINY,
        ]
    )
    assert rc == 0
    (row,) = metrics_rows(tmp_path / "run")
    assert row["step"] == 1 and row["eval_images"] == 4
    rc = T.main(
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.root={root}",
            f"data.train_split={spelling}",
            "data.val_split=valid",
            "training.max_steps=2",
            "model.width=8",
            *TINY,
            "--resume",
        ]
    )
    assert rc == 0
    assert [r["step"] for r in metrics_rows(tmp_path / "run")] == [1, 2]  # continued, not restarted


def test_wrong_root_reports_the_coco_path_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = T.main([f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'no' / 'coco'}", *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert "instances_train2017.json" in err and "does not exist" in err and "Fix:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.train_split=trian", "closest valid names: train"),
        ("model.name=fasterrcnn_resnet_fpn", "closest: fasterrcnn_resnet50_fpn"),
        ("training.deepspeed.enabled=true", "pip install 'ratlib[deepspeed]'"),
        ("model.weights=/no/such/weights.pt", "no such file"),
    ],
)
def test_input_errors_are_one_message(
    tmp_path: Path,
    coco_root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    override: str,
    expected: str,
) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: `import deepspeed` raises
    rc = T.main([f"output_dir={tmp_path / 'run'}", f"data.root={coco_root}", *TINY, override])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err


@pytest.mark.parametrize("key", ["train_split", "val_split"])
def test_a_misspelt_split_on_the_synthetic_path_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """Issue 23 item 5: with data.root null a misspelt split was a doubled traceback and exit 1."""
    rc = T.main([f"output_dir={tmp_path / 'run'}", *TINY, f"data.{key}=trian"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count(f"data.{key}='trian'") == 1 and "closest valid names: train" in err
    assert not (tmp_path / "run" / "data").exists()  # nothing written before the message


@pytest.mark.parametrize("flag", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"]])
def test_the_deepspeed_launcher_s_local_rank_flag_is_accepted_and_the_environment_wins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    assert parse_args([*flag, "a=1"], "").local_rank == 3
    rc = T.main([*flag, "--eval-only", f"output_dir={tmp_path / 'run'}", *TINY])  # one process: rank 0
    err = capsys.readouterr().err
    assert rc == 2 and "--eval-only: checkpoint" in err and "unrecognized arguments" not in err


def test_the_docs_snippet_imports_the_example_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 item 3: the "Calling it from Python" snippet of docs/examples/detection.md runs (here with
    a smoke config and a one-image synthetic set)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "examples" / "detection.md").read_text()
    snippet = doc.split("## Calling it from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "import ratlib" in snippet and "sys.modules" in snippet
    snippet = snippet.replace(
        '"training.max_steps=50"',
        f'"output_dir={tmp_path}", "model.width=8", "smoke=true", '
        '"data.synthetic.train_images=2", "data.synthetic.val_images=2", "data.num_workers=0"',
    )
    snippet = snippet.replace('run_dir="runs/a"', f'run_dir="{tmp_path}"')
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    namespace: dict = {}
    exec(compile(snippet, "detection.md", "exec"), namespace)
    assert namespace["metrics"]["eval_images"] == 2.0 and "map" in namespace["metrics"]


def test_local_weights_load_with_a_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = T.DetectionModel(name="fasterrcnn_tiny", min_size=128, max_size=128)
    source = du.build_model(m, 4)
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pt")
    caplog.set_level("INFO")
    other = du.build_model(m.model_copy(update={"weights": str(tmp_path / "ckpt.pt")}), 3)  # 2 classes: heads differ
    assert "skipped 4 with another shape" in caplog.text  # the class and box predictors
    assert torch.equal(other.backbone[0][0].weight, source.backbone[0][0].weight)


# ----------------------------------------------------------------------------------------------
# Learning, 1 rank and 2 ranks, resume, evaluation parity


@pytest.mark.slow
def test_one_rank_learns_past_threshold(tmp_path: Path, coco_root: Path, one_thread) -> None:
    cfg = config(f"data.root={coco_root}", "training.max_steps=40")
    _, val_set = du.build_datasets(cfg, tmp_path, masks=False)
    untrained = du.evaluate(
        du.build_model(cfg.model, val_set.num_classes),
        eval_loader(cfg, val_set, CPU, du.collate),
        val_set,
        torch.device("cpu"),
    )
    metrics = T.train(cfg, run_dir=tmp_path, info=CPU)
    assert untrained["map50"] < UNTRAINED_AP50_MAX
    assert metrics["map50"] > AP50_THRESHOLD, metrics
    rows = metrics_rows(tmp_path)
    assert rows[-1]["step"] == 40 and rows[-1]["map50"] == metrics["map50"]
    assert rows[0]["train_images"] == 32 and rows[0]["train_unique_images"] == 32
    assert (tmp_path / "config.yaml").is_file() and RunCheckpoints(tmp_path).latest() is not None


@pytest.mark.slow
def test_eval_only_on_the_command_line_evaluates_the_checkpoint_without_training(
    tmp_path: Path, one_thread, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = [f"output_dir={run}", *TINY, "model.width=8", "data.synthetic.train_images=8", "data.synthetic.val_images=4"]
    assert T.main([*args, "training.max_steps=1"]) == 0
    (row,) = metrics_rows(run)
    assert row["step"] == 1
    ckpts = sorted((run / "checkpoints").glob("*.pt"))
    assert [c.name for c in ckpts] == ["epoch0000.pt"]
    before = {c: c.read_bytes() for c in ckpts}, (run / "metrics.jsonl").read_text()
    assert "optimiser steps per epoch" in capsys.readouterr().err  # train() logs it (read: the check below)

    assert T.main([*args, "--eval-only"]) == 0  # the latest checkpoint of output_dir
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint"] == str(ckpts[0]) and result["eval_images"] == 4
    assert set(du.STAT_NAMES) <= set(result) and len(du.STAT_NAMES) == 12
    for key in du.STAT_NAMES:  # COCOeval gives -1 where an area range has no ground truth
        assert result[key] == -1.0 or 0.0 <= result[key] <= 1.0, (key, result[key])
        assert result[key] == pytest.approx(row[key], abs=1e-9), key  # the figures training logged for it
    after = {c: c.read_bytes() for c in sorted((run / "checkpoints").glob("*.pt"))}, (run / "metrics.jsonl").read_text()
    assert after == before  # no training: no new checkpoint, no new metrics row, the checkpoint untouched
    assert "optimiser steps per epoch" not in capsys.readouterr().err  # train() never started

    (run / "eval.json").unlink()
    assert T.main([*args, "--eval-only", "--checkpoint", str(ckpts[0])]) == 0  # the flag, explicitly
    again = json.loads((run / "eval.json").read_text())
    assert {k: again[k] for k in ("checkpoint", "eval_images", *du.STAT_NAMES)} == {
        k: result[k] for k in ("checkpoint", "eval_images", *du.STAT_NAMES)
    }
    assert T.main([f"output_dir={tmp_path / 'empty'}", *TINY, "--eval-only"]) == 2  # nothing to evaluate
    err = capsys.readouterr().err
    assert "--eval-only: checkpoint" in err and "not found" in err and "Traceback" not in err


def two_rank_scenario(run: str, root: str) -> int:
    """On each of 2 ranks (one launch, to pay the torch/torchvision start-up once): train 20 steps, resume
    to 40 steps, evaluate the last checkpoint; each rank writes what train/evaluate returned."""
    from ratlib import distributed, setup_logging

    setup_logging(log_dir=Path(run) / "logs")
    common = (f"output_dir={run}", f"data.root={root}")
    with distributed(device="cpu") as info:
        first = T.train(config(*common, "training.max_steps=20"), run_dir=run, info=info)
        resumed = T.train(config(*common, "training.max_steps=40"), run_dir=run, resume=True, info=info)
        evaluated = T.evaluate_checkpoint(config(*common), run_dir=run, info=info)
        out = {"first": first, "resumed": resumed, "evaluated": evaluated}
        (Path(run) / f"returned{info.rank}.json").write_text(json.dumps(out))
    return 0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_learn_resume_and_evaluate_like_one_rank(tmp_path: Path, coco_root: Path, one_thread) -> None:
    run = tmp_path / "run"
    run_on_ranks(two_rank_scenario, 2, args=(str(run), str(coco_root)), env=NO_GPU, timeout=300).check()
    rows = metrics_rows(run)
    first = [r for r in rows if r["step"] <= 20]
    assert first[-1]["step"] == 20 and first[-1]["epoch"] == 4  # 4 steps per epoch (32 images, 2 x 4)
    assert all(r["train_images"] == r["train_unique_images"] == 32 for r in rows)  # each image once per epoch
    resumed = [r for r in rows if r["step"] > 20]
    assert resumed[0]["epoch"] == 5 and resumed[-1]["step"] == 40
    final = rows[-1]
    assert final["map50"] > AP50_THRESHOLD, final

    returned = [json.loads((run / f"returned{r}.json").read_text()) for r in range(2)]
    assert returned[0] == returned[1]  # every rank gets the main rank's figures
    assert returned[0]["resumed"] == {k: final[k] for k in returned[0]["resumed"]}

    # The final checkpoint evaluated on 2 ranks (each predicting its half of val), and here on 1 rank:
    # the same figures, equal to the 2-rank evaluation that ended training (buffers synced first).
    two = returned[0]["evaluated"]
    one = T.evaluate_checkpoint(config(f"data.root={coco_root}", f"output_dir={run}"), run_dir=run, info=CPU)
    assert two["eval_images"] == one["eval_images"] == 16
    for key in du.STAT_NAMES:
        assert one[key] == pytest.approx(two[key], abs=1e-9), key
        assert one[key] == pytest.approx(final[key], abs=1e-9), key


@pytest.mark.slow
@pytest.mark.distributed
def test_smoke_on_two_ranks_trains_on_exactly_the_limit(tmp_path: Path, one_thread) -> None:
    run = tmp_path / "run"
    result = run_on_ranks(
        TRAIN_PY,
        2,
        args=[
            f"output_dir={run}",
            *TINY,
            "smoke=true",
            "data.limit=7",
            "data.synthetic.train_images=20",
            "data.synthetic.val_images=8",
            "model.width=8",
        ],
        env=NO_GPU,
        timeout=240,
    ).check()
    (row,) = metrics_rows(run)
    assert row["train_images"] == 7 and row["train_unique_images"] == 7
    # "finishes in seconds" (#13) is the work done: one epoch of one step on 7 images; speed: benchmarks/
    assert row["eval_images"] == 7 and row["step"] == 1  # 7 images, batch 4 on 2 ranks: one step per epoch
    assert len(row["peak_memory_gib"]) == 2 and row["peak_memory_kind"] == "rss"  # every rank's peak (#13)
    assert row["peak_memory_max_gib"] == max(row["peak_memory_gib"]) and row["peak_memory_max_rank"] in (0, 1)
    assert math.isfinite(row["train/epoch_loss"]) and result.returncodes == [0, 0]


def deepspeed_scenario(run: str) -> int:
    """2 ranks, DeepSpeed ZeRO stage 2 on the CPU: train one epoch, then resume for a second one."""
    from ratlib import distributed, setup_logging

    setup_logging(log_dir=Path(run) / "logs")
    ds = (
        f"output_dir={run}",
        *TINY,
        "model.width=8",
        "training.deepspeed.enabled=true",
        "training.deepspeed.zero_stage=2",
        "data.synthetic.train_images=16",
        "data.synthetic.val_images=8",
    )
    with distributed(device="cpu") as info:
        T.train(config(*ds, "training.num_epochs=1"), run_dir=run, info=info)
        T.train(config(*ds, "training.num_epochs=2"), run_dir=run, resume=True, info=info)
    return 0


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_ranks_trains_saves_and_resumes(tmp_path: Path, one_thread) -> None:
    require("deepspeed")
    run = tmp_path / "run"
    result = run_on_ranks(
        deepspeed_scenario, 2, args=(str(run),), env={**NO_GPU, "DS_ACCELERATOR": "cpu"}, timeout=420
    ).check()
    rows = metrics_rows(run)
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 2), (1, 4)]  # 16 images / (2 ranks x 4): 2 steps
    assert all(math.isfinite(r["train/epoch_loss"]) for r in rows) and rows[1]["train_unique_images"] == 16
    assert (run / "checkpoints" / "deepspeed" / "epoch0001").is_dir()
    assert "resumed from" in result.outputs[0] and "epoch 0 done, step 2" in result.outputs[0]


# ----------------------------------------------------------------------------------------------
# Preemption (issue 22) and plain-data checkpoints (issue 25)


def preempt_run(run: str, root: str, signal_at: int, resume: bool) -> int:
    """One rank of a 2-rank run (one epoch of 4 steps); rank 1 sends itself SIGTERM after step ``signal_at``."""
    from ratlib import distributed

    torch.set_num_threads(1)
    signal_rank_1_after(T, signal_at)
    common = (f"data.root={root}", "training.num_epochs=1", "training.log_every=1", "model.width=8")
    with distributed(device="cpu") as info:
        T.train(config(*common), run_dir=run, resume=resume, info=info)
    return 0


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_rank_1_stops_mid_epoch_and_the_resume_finishes_it_without_doubled_rows(
    tmp_path: Path, coco_root: Path, one_thread
) -> None:
    run = tmp_path / "run"
    stopped = run_on_ranks(preempt_run, 2, args=(str(run), str(coco_root), 1, False), env=NO_GPU, timeout=300)
    assert stopped.returncodes == [75, 75], str(stopped)
    mid = torch.load(run / "checkpoints" / "epoch0000.pt", map_location="cpu", weights_only=True)
    assert 0 < mid["sampler"]["position"] < 4 and mid["step"] == mid["sampler"]["position"], mid["sampler"]
    assert not metrics_rows(run)  # no epoch row yet
    run_on_ranks(preempt_run, 2, args=(str(run), str(coco_root), 0, True), env=NO_GPU, timeout=300).check()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # each step once, continued
    (row,) = metrics_rows(run)
    assert row["epoch"] == 0 and row["step"] == 4 and row["train_images"] == 32 - 4 * 2 * mid["step"]
    final = torch.load(run / "checkpoints" / "epoch0000.pt", map_location="cpu", weights_only=True)
    assert final["step"] == 4 and final["sampler"]["position"] == 4


# ----------------------------------------------------------------------------------------------
# Resuming on another number of ranks with training.global_batch_size (issue 32)

# global batches of 8 over 32 images: 4 steps an epoch; 2 ranks: 4 images each, 1 rank: 2 micro-batches of 4,
# 3 ranks: parts of 3/3/2
GLOBAL = ("training.global_batch_size=8", "training.num_epochs=2", "training.log_every=1", "model.width=8")


def global_batch_run(run: str, root: str, signal_at: int, resume: bool) -> int:
    """One rank of a run on global batches; rank 1 sends itself SIGTERM after step ``signal_at`` (0: never). Every
    micro-batch this rank's training sampler draws is appended, with its epoch and global step, to
    ``run/batches{rank}.{launch}.jsonl`` (launch 0: the first, 1: the resume)."""
    from ratlib import distributed

    torch.set_num_threads(1)
    signal_rank_1_after(T, signal_at)
    iterate = ShardedBatchSampler.__iter__

    def logged(self):
        with open(Path(run) / f"batches{self.rank}.{int(resume)}.jsonl", "a") as f:
            for batch in iterate(self):
                f.write(json.dumps([self.epoch, (self.position - 1) // self.accumulation_steps, batch]) + "\n")
                f.flush()
                yield batch

    ShardedBatchSampler.__iter__ = logged
    with distributed(device="cpu") as info:
        T.train(config(f"data.root={root}", *GLOBAL), run_dir=run, resume=resume, info=info)
    return 0


def global_batches(run: Path, launch: int) -> dict[tuple[int, int], list[int]]:
    """(epoch, step) -> the sorted indices of that global step, from every rank's file of one launch."""
    out: dict[tuple[int, int], list[int]] = {}
    for path in sorted(run.glob(f"batches*.{launch}.jsonl")):
        for line in path.read_text().splitlines():
            epoch, step, indices = json.loads(line)
            out.setdefault((epoch, step), []).extend(indices)
    return {k: sorted(v) for k, v in sorted(out.items())}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("after", [1, 3])
def test_a_run_stopped_on_two_ranks_resumes_on_another_number_with_the_same_global_batches(
    tmp_path: Path, coco_root: Path, one_thread, after: int
) -> None:
    """SIGTERM to rank 1 after step 1 of 8 on 2 ranks (mid-epoch 0), then --resume on 1 rank or 3: the global
    batches after the resume are the uninterrupted 2-rank run's, index by index, and each step is tracked once.
    (Only the indices: the tiny backbone's BatchNorm sees another split of each global batch, and the random
    flips come from each rank's torch generator, not from per-sample seeds, so images and weights differ.)"""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_on_ranks(global_batch_run, 2, args=(str(whole), str(coco_root), 0, False), env=NO_GPU, timeout=300).check()
    stopped = run_on_ranks(global_batch_run, 2, args=(str(split), str(coco_root), 1, False), env=NO_GPU, timeout=300)
    assert stopped.returncodes == [75, 75], str(stopped)
    mid = torch.load(split / "checkpoints" / "epoch0000.pt", map_location="cpu", weights_only=True)
    assert mid["sampler"]["global_position"] == mid["step"] in (1, 2) and mid["sampler"]["world_size"] == 2
    run_on_ranks(global_batch_run, after, args=(str(split), str(coco_root), 0, True), env=NO_GPU, timeout=300).check()
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))  # every step once, continued
    assert [r["epoch"] for r in rows if "epoch" in r] == [0, 1]
    first, second = global_batches(split, 0), global_batches(split, 1)
    assert not first.keys() & second.keys() and max(first) == (0, mid["step"] - 1), (list(first), list(second))
    assert {**first, **second} == global_batches(whole, 0)  # index by index
    assert len(list(split.glob("batches*.1.jsonl"))) == after
    final = torch.load(split / "checkpoints" / "epoch0001.pt", map_location="cpu", weights_only=True)
    assert final["step"] == 8 and final["sampler"]["world_size"] == after

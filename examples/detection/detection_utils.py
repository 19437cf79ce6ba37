"""Data, sampling, evaluation and a tiny model for examples/detection/train.py.

Like torchvision's references/detection (coco_utils.py, group_by_aspect_ratio.py, coco_eval.py), in one
file so that train.py stays a readable loop:

- ``CocoDetection``: a COCO-format split as torchvision detection targets (xyxy boxes, contiguous labels,
  image_id, optional masks); crowd boxes out of training, degenerate boxes and empty images counted.
- ``ShardedBatchSampler``: shuffled, aspect-ratio-grouped batches, every image of the epoch exactly once
  across ranks, the same number of batches on every rank (no DistributedSampler padding).
- ``evaluate``: each rank predicts on its shard, the main rank gathers COCO results (a small array per
  rank, never evaluator state), keeps each image once and runs COCOeval once.
- ``fasterrcnn_tiny``: a torchvision Faster R-CNN on a 6-layer CNN, for CPU demos and tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ratlib import gather_object, get_logger, progress
from ratlib.hang import heartbeat

log = get_logger(__name__)

#: The 12 numbers of COCOeval.summarize(), in its order.
STAT_NAMES = (
    "map",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


# ----------------------------------------------------------------------------------------------
# Dataset


def _quiet_coco(annotation_file: str | os.PathLike[str]) -> Any:
    """pycocotools' COCO, without its prints; a broken file names itself."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(os.fspath(annotation_file))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as exc:
        raise ValueError(
            f"{annotation_file}: not a COCO instances file ({type(exc).__name__}: {exc}); expected "
            "JSON with 'images', 'annotations' and 'categories' lists (check with `ratlib coco`)"
        ) from exc


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split as ``(image, target)`` pairs for torchvision's detection models.

    ``target``: ``boxes`` (float xyxy, clipped to the image), ``labels`` (1..K, contiguous, from the sorted
    category ids; 0 is background), ``image_id`` (int), and ``masks`` (uint8, N x H x W) with ``masks=True``.
    With ``train=True`` crowd boxes are skipped and images left without boxes are dropped unless
    ``keep_empty``. Degenerate boxes (no width or height after clipping) are dropped in every split.
    Each count is logged. ``limit`` keeps the first N images (by image id) after that filtering.
    """

    def __init__(
        self,
        images: str | os.PathLike[str],
        annotations: str | os.PathLike[str],
        *,
        train: bool,
        limit: int | None = None,
        keep_empty: bool = False,
        masks: bool = False,
        transforms: Any = None,
        name: str = "",
    ) -> None:
        self.images = Path(images)
        self.coco = _quiet_coco(annotations)
        self.train, self.masks, self.transforms = train, masks, transforms
        self.name = name or Path(annotations).name
        cat_ids = sorted(self.coco.getCatIds())
        if not cat_ids:
            raise ValueError(f"{annotations}: no categories; a COCO detection file needs a 'categories' list")
        self.label_to_cat = [0, *cat_ids]  # label -> COCO category id (label 0: background)
        self.cat_to_label = {c: i for i, c in enumerate(self.label_to_cat) if i}
        self.class_names = ["__background__", *(self.coco.cats[c]["name"] for c in cat_ids)]

        crowd = degenerate = 0
        degenerate_examples: list[int] = []
        self.ids: list[int] = []
        self.targets: dict[int, tuple[list[list[float]], list[int], list[int]]] = {}
        empty = 0
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            width, height = info["width"], info["height"]
            boxes, labels, ann_ids = [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if train and ann.get("iscrowd", 0):
                    crowd += 1
                    continue
                x, y, w, h = ann["bbox"]
                x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
                x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
                if x1 <= x0 or y1 <= y0:
                    degenerate += 1
                    if len(degenerate_examples) < 5:
                        degenerate_examples.append(ann["id"])
                    continue
                if ann["category_id"] not in self.cat_to_label:
                    raise ValueError(
                        f"{annotations}: annotation {ann['id']} has category_id {ann['category_id']}, "
                        f"which is not in 'categories' ({cat_ids}); fix the export"
                    )
                boxes.append([x0, y0, x1, y1])
                labels.append(self.cat_to_label[ann["category_id"]])
                ann_ids.append(ann["id"])
            if train and not boxes and not keep_empty:
                empty += 1
                continue
            self.ids.append(image_id)
            self.targets[image_id] = (boxes, labels, ann_ids)
        total = len(self.ids)
        if limit is not None:
            self.ids = self.ids[:limit]
        if crowd:
            log.info("%s: %d crowd boxes skipped for training (iscrowd=1)", self.name, crowd)
        if degenerate:
            log.warning(
                "%s: dropped %d degenerate boxes (no width or height after clipping to the image), "
                "e.g. annotation ids %s",
                self.name,
                degenerate,
                degenerate_examples,
            )
        if empty:
            log.info(
                "%s: %d images without usable boxes left out of training (data.keep_empty=true keeps them "
                "as negatives)",
                self.name,
                empty,
            )
        if not self.ids:
            raise ValueError(
                f"{annotations}: no images left for {'training' if train else 'evaluation'} "
                f"({empty} without usable boxes, limit={limit}); check the split and the annotations"
            )
        log.info(
            "%s: %d images%s, %d classes",
            self.name,
            len(self.ids),
            f" (data.limit={limit} of {total})" if limit is not None and limit < total else "",
            len(cat_ids),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's detection models count them."""
        return len(self.label_to_cat)

    def aspect_groups(self) -> list[int]:
        """Per image: 0 for landscape or square, 1 for portrait (from the JSON, no image reads)."""
        return [int(self.coco.imgs[i]["height"] > self.coco.imgs[i]["width"]) for i in self.ids]

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        from PIL import Image
        from torchvision import tv_tensors

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.images / info["file_name"]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except OSError as exc:
            raise OSError(
                f"{self.name}: image {image_id} ({info['file_name']}) cannot be read at {path}: {exc}; "
                "check that the image folder matches the annotation file"
            ) from exc
        boxes, labels, ann_ids = self.targets[image_id]
        size = (image.height, image.width)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=size
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            masks = [self.coco.annToMask(self.coco.anns[a]) for a in ann_ids]
            target["masks"] = tv_tensors.Mask(
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *size), dtype=torch.uint8)
            )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def make_transforms(train: bool) -> Any:
    """PIL image -> float tensor in [0, 1] (the model normalises and resizes); random flips for training."""
    from torchvision.transforms import v2 as T

    steps = [T.ToImage()]
    if train:
        steps.append(T.RandomHorizontalFlip(0.5))
    steps += [T.ToDtype(torch.float32, scale=True), T.ToPureTensor()]
    return T.Compose(steps)


def collate(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[tuple[Any, ...], ...]:
    """Detection batches are lists: images differ in size and in their number of boxes."""
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------------------------
# Sampling


def _split_even(items: list[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Training batches for one rank: every image of the epoch exactly once across all ranks.

    Each epoch the indices are shuffled (same seed on every rank), dealt to the ranks round-robin (shard
    sizes differ by at most one), ordered by aspect group within the shard (landscape images batch with
    landscape ones, as torchvision's GroupedBatchSampler does) and cut into ``len(self)`` batches, the
    same number on every rank so that DDP's collectives line up. The last batches of a smaller shard are
    one image shorter instead of padded with repeats (DistributedSampler's way), so an epoch trains on
    each image once. Only when a shard has fewer images than there are steps (batch_size 1 and an
    uneven split) are its own images repeated, with a warning.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"ShardedBatchSampler: batch_size={batch_size}, rank={rank}, world_size={world_size}; "
                "expected batch_size >= 1 and 0 <= rank < world_size"
            )
        if len(groups) < world_size:
            raise ValueError(
                f"ShardedBatchSampler: {len(groups)} training images for {world_size} ranks; every "
                "rank needs at least one: use more images (data.limit) or fewer ranks"
            )
        self.groups, self.batch_size = list(groups), batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0
        self.repeated = 0  # images repeated in the last epoch on this rank (see the class docstring)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.groups) / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = (
            torch.randperm(len(self.groups), generator=g).tolist() if self.shuffle else list(range(len(self.groups)))
        )
        shard = order[self.rank :: self.world_size]
        shard.sort(key=lambda i: self.groups[i])  # stable: random order within a group
        steps = len(self)
        self.repeated = max(0, steps - len(shard))
        if self.repeated:
            log.warning(
                "rank %d: %d images in its shard for %d steps (batch_size=%d): %d images repeated this "
                "epoch to keep the ranks in step",
                self.rank,
                len(shard),
                steps,
                self.batch_size,
                self.repeated,
                main_process_only=False,
            )
            shard = (shard * steps)[:steps]
        batches = _split_even(shard, steps)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(steps, generator=g).tolist()]
        yield from batches


def eval_shard(num_images: int, rank: int, world_size: int) -> list[int]:
    """Evaluation indices for one rank: round-robin, no padding, so each image is predicted once."""
    return list(range(rank, num_images, world_size))


# ----------------------------------------------------------------------------------------------
# Evaluation


def to_coco_results(
    outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int], label_to_cat: Sequence[int]
) -> np.ndarray:
    """Model outputs as COCO results rows ``[image_id, x, y, w, h, score, category_id]`` (float64), the
    array form that ``COCO.loadRes`` reads; labels are mapped back to the file's category ids."""
    lookup = torch.tensor(label_to_cat, dtype=torch.float64)
    rows = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().to("cpu", torch.float64)
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        rows.append(
            torch.cat(
                [
                    torch.full((len(boxes), 1), float(image_id), dtype=torch.float64),
                    xywh,
                    out["scores"].detach().to("cpu", torch.float64)[:, None],
                    lookup[out["labels"].detach().cpu()][:, None],
                ],
                dim=1,
            )
        )
    return torch.cat(rows).numpy() if rows else np.zeros((0, 7))


def merge_rank_results(per_rank: Sequence[tuple[list[int], np.ndarray]]) -> tuple[list[int], np.ndarray, int]:
    """Join the ranks' ``(image ids predicted, results rows)``: each image is kept once, from the first
    rank that predicted it (a padding sampler predicts some twice). Returns ids, rows, duplicates dropped."""
    seen: set[int] = set()
    ids: list[int] = []
    rows: list[np.ndarray] = []
    duplicates = 0
    for rank_ids, rank_rows in per_rank:
        new = [i for i in dict.fromkeys(rank_ids) if i not in seen]
        duplicates += len(set(rank_ids)) - len(new)
        seen.update(new)
        ids += new
        if len(rank_rows):
            rows.append(rank_rows[np.isin(rank_rows[:, 0], np.asarray(new, dtype=np.float64))])
    return sorted(ids), (np.concatenate(rows) if rows else np.zeros((0, 7))), duplicates


def coco_eval(
    gt: Any, results: np.ndarray, image_ids: Sequence[int], *, backend: str = "auto"
) -> tuple[dict[str, float], str]:
    """Run COCOeval (bbox) once on ``results`` for ``image_ids`` of the ground truth ``gt`` (a pycocotools
    COCO). ``backend``: "pycocotools", "faster_coco_eval", or "auto" (faster-coco-eval when installed).
    Returns the 12 standard figures by ``STAT_NAMES`` and the printed summary."""
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401

            backend = "faster_coco_eval"
        except ImportError:
            backend = "pycocotools"
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        except ImportError as exc:
            raise ImportError(
                "eval.backend='faster_coco_eval' but faster-coco-eval is not installed: "
                "pip install faster-coco-eval, or set eval.backend=pycocotools"
            ) from exc
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(gt.dataset)
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        raise ValueError(f"coco_eval: backend={backend!r}; expected 'auto', 'pycocotools' or 'faster_coco_eval'")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if len(results):
            dt = gt.loadRes(
                results
                if backend == "pycocotools"
                else [
                    {
                        "image_id": int(r[0]),
                        "bbox": [float(v) for v in r[1:5]],
                        "score": float(r[5]),
                        "category_id": int(r[6]),
                    }
                    for r in results
                ]
            )
        else:  # loadRes cannot take an empty list: an empty result set scores 0
            dt = COCO()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": list(gt.dataset["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, evaluator.stats)}, buffer.getvalue()


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Any,
    label_to_cat: Sequence[int],
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
) -> tuple[list[int], np.ndarray]:
    """This rank's predictions on its loader, as ``(image ids, COCO results rows)``."""
    model.eval()
    ids: list[int] = []
    rows: list[np.ndarray] = []
    for images, targets in progress(loader, desc="eval", leave=False):
        with autocast():
            outputs = model([img.to(device, non_blocking=True) for img in images])
        image_ids = [t["image_id"] for t in targets]
        ids += image_ids
        heartbeat(-1)  # progress for ratlib.hang's stall watchdog (step -1: evaluating)
        rows.append(to_coco_results(outputs, image_ids, label_to_cat))
    return ids, (np.concatenate(rows) if rows else np.zeros((0, 7)))


def evaluate(
    model: nn.Module,
    loader: Any,
    dataset: CocoDetection,
    device: torch.device,
    *,
    is_main: bool,
    autocast: Any = contextlib.nullcontext,
    backend: str = "auto",
) -> dict[str, float] | None:
    """Distributed COCO evaluation of ``dataset`` (whose shard for this rank ``loader`` yields).

    Every rank predicts on its shard and joins one gather of ``(image ids, results array)``; the main
    rank keeps each image once, checks that every image of ``dataset`` was predicted, runs COCOeval once
    and returns the 12 figures plus ``eval_images``, ``eval_duplicates`` and ``eval_time_s``. Other
    ranks return None.
    """
    start = time.perf_counter()
    ids, rows = predict(model, loader, dataset.label_to_cat, device, autocast)
    per_rank = gather_object((ids, rows), dst=0)  # every rank joins, also with an empty shard
    if not is_main:
        return None
    assert per_rank is not None
    image_ids, results, duplicates = merge_rank_results(per_rank)
    missing = sorted(set(dataset.ids) - set(image_ids))
    if missing:
        raise RuntimeError(
            f"evaluation of {dataset.name}: {len(missing)} of {len(dataset)} images were predicted "
            f"by no rank (e.g. {missing[:5]}); the evaluation loaders must cover the split "
            "(see eval_shard)"
        )
    if duplicates:
        log.info("evaluation: %d duplicate predictions (sampler padding) dropped by image id", duplicates)
    metrics, summary = coco_eval(dataset.coco, results, image_ids, backend=backend)
    log.info(
        "COCO bbox evaluation of %s: %d images, %d detections, gathered from %d rank(s)\n%s",
        dataset.name,
        len(image_ids),
        len(results),
        len(per_rank),
        summary.rstrip(),
    )
    metrics.update(
        eval_images=float(len(image_ids)), eval_duplicates=float(duplicates), eval_time_s=time.perf_counter() - start
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# A tiny detector for CPU demos and tests


class TinyBackbone(nn.Sequential):
    """Three stride-2 stages of two 3x3 convs each (stride 8, ``2 * width`` channels)."""

    def __init__(self, width: int = 32) -> None:
        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        super().__init__(stage(3, width // 2), stage(width // 2, width), stage(width, 2 * width))
        self.out_channels = 2 * width


def fasterrcnn_tiny(num_classes: int, *, width: int = 32, **kwargs: Any) -> nn.Module:
    """torchvision's FasterRCNN on ``TinyBackbone``: one feature map, anchors 16-64 px, a 256-wide box
    head. About 1M parameters: learns the synthetic shapes on a CPU in a minute. Not for real data."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = TinyBackbone(width)
    kwargs.setdefault("box_batch_size_per_image", 128)
    kwargs.setdefault("rpn_batch_size_per_image", 128)
    return FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(backbone.out_channels * 49, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        **kwargs,
    )

"""Data, sampling, evaluation and a tiny model for examples/detection/train.py.

Like torchvision's references/detection (coco_utils.py, group_by_aspect_ratio.py, coco_eval.py), in one
file so that train.py stays a readable loop:

- ``CocoDetection``: a COCO-format split as torchvision detection targets (xyxy boxes, contiguous labels,
  image_id, optional masks); crowd boxes out of training, degenerate boxes and empty images counted.
- ``resolve_splits`` and ``build_datasets``: the train and val splits under ``data.root`` (any layout and
  split spelling ``ratlib.coco_paths`` reads), or the synthetic default.
- ``build_model``: a torchvision detection model by name, or ``fasterrcnn_tiny`` (a Faster R-CNN on a
  6-layer CNN, for CPU demos and tests); local weights load with a report.
- ``evaluate``: each rank predicts on its share (``ratlib.data.EvalSampler``), ``gather_by_index`` joins the
  COCO results rows (a small array per image, never evaluator state) on the main rank and checks that
  every image was predicted once, and COCOeval runs once.

Sampling is ratlib's (``ratlib.data.ShardedBatchSampler`` with the aspect groups of ``aspect_groups``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ratlib import CocoPathError, get_logger, main_process_first, parse_split, progress, resolve_coco
from ratlib.config_defaults import UsageError
from ratlib.data import gather_by_index
from ratlib.hang import heartbeat
from ratlib.synthetic import make_coco_detection

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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, dict[str, Any]]:
        """An image and its target; ``key`` is an index, or ``(index, augmentation seed)`` from
        ``ShardedBatchSampler(augmentation_seeds=True)``: the random flip then depends on the sample alone, the
        same on any rank, at any number of ranks and after any resume."""
        from PIL import Image
        from torchvision import tv_tensors

        index, seed = key if isinstance(key, tuple) else (key, None)
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
        if self.transforms is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global generator
                torch.manual_seed(seed)
                image, target = self.transforms(image, target)
        elif self.transforms is not None:
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
# The splits train.py trains and evaluates on


def resolve_splits(cfg: Any, run_dir: Path) -> tuple[Any, Any]:
    """``CocoPaths`` of the train and val splits: under ``data.root``, or the synthetic default written
    into the run folder (by the main rank first)."""
    d = cfg.data
    for key, split in (("train_split", d.train_split), ("val_split", d.val_split)):
        try:  # a split name coco_paths does not know: one message, also on the synthetic path
            parse_split(split)
        except ValueError as exc:
            raise UsageError(f"data.{key}={split!r}: {exc}") from None
    root = d.root
    if root is None:
        root = str(run_dir / "data")
        layout = "coco" if d.layout == "auto" else d.layout
        with main_process_first():
            for split, n in ((d.train_split, d.synthetic.train_images), (d.val_split, d.synthetic.val_images)):
                try:
                    resolve_coco(root, split, layout=layout)
                except CocoPathError:
                    make_coco_detection(
                        root,
                        split,
                        num_images=n,
                        layout=layout,
                        seed=d.synthetic.seed,
                        image_size=d.synthetic.image_size,
                    )
                    log.info("wrote a synthetic COCO %s split (%d images) under %s", split, n, root)
    return resolve_coco(root, d.train_split, layout=d.layout), resolve_coco(root, d.val_split, layout=d.layout)


def build_datasets(cfg: Any, run_dir: Path, masks: bool) -> tuple[CocoDetection, CocoDetection]:
    train_paths, val_paths = resolve_splits(cfg, run_dir)
    log.info("data: train %s, val %s (%s layout)", train_paths.annotations, val_paths.annotations, train_paths.layout)
    train_set = CocoDetection(
        train_paths.images,
        train_paths.annotations,
        train=True,
        limit=cfg.data.limit,
        keep_empty=cfg.data.keep_empty,
        masks=masks,
        transforms=make_transforms(True),
        name=str(train_paths.split),
    )
    val_set = CocoDetection(
        val_paths.images,
        val_paths.annotations,
        train=False,
        limit=cfg.data.limit,
        transforms=make_transforms(False),
        name=str(val_paths.split),
    )
    if val_set.label_to_cat != train_set.label_to_cat:
        raise UsageError(
            f"the categories differ between {train_paths.annotations} ({train_set.label_to_cat[1:]}) "
            f"and {val_paths.annotations} ({val_set.label_to_cat[1:]}); both splits need the same list"
        )
    return train_set, val_set


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
    model: nn.Module, loader: Any, dataset: CocoDetection, device: torch.device, autocast: Any = contextlib.nullcontext
) -> dict[int, np.ndarray]:
    """This rank's predictions on its loader: COCO results rows by dataset index (an image without
    detections has an empty array)."""
    model.eval()
    index_of = {image_id: i for i, image_id in enumerate(dataset.ids)}
    results: dict[int, np.ndarray] = {}
    for images, targets in progress(loader, desc="eval", leave=False):
        with autocast():
            outputs = model([img.to(device, non_blocking=True) for img in images])
        for out, target in zip(outputs, targets):
            results[index_of[target["image_id"]]] = to_coco_results([out], [target["image_id"]], dataset.label_to_cat)
        heartbeat(-1)  # progress for ratlib.hang's stall watchdog (step -1: evaluating)
    return results


def evaluate(
    model: nn.Module,
    loader: Any,
    dataset: CocoDetection,
    device: torch.device,
    *,
    autocast: Any = contextlib.nullcontext,
    backend: str = "auto",
) -> dict[str, float] | None:
    """Distributed COCO evaluation of ``dataset`` (whose share for this rank ``loader`` yields).

    Every rank predicts on its share and joins one ``gather_by_index``, which checks on the main rank
    that every image was predicted exactly once (a missing or doubled image is an error on every rank);
    the main rank runs COCOeval once and returns the 12 figures plus ``eval_images`` and ``eval_time_s``.
    Other ranks return None.
    """
    start = time.perf_counter()
    merged = gather_by_index(predict(model, loader, dataset, device, autocast), len(dataset))
    if merged is None:
        return None
    results = np.concatenate([np.zeros((0, 7)), *merged.values()])
    metrics, summary = coco_eval(dataset.coco, results, dataset.ids, backend=backend)
    log.info(
        "COCO bbox evaluation of %s: %d images, %d detections\n%s",
        dataset.name,
        len(merged),
        len(results),
        summary.rstrip(),
    )
    metrics.update(eval_images=float(len(merged)), eval_time_s=time.perf_counter() - start)
    return metrics


# ----------------------------------------------------------------------------------------------
# Models


def model_names() -> list[str]:
    """The detection models this example builds: torchvision's (not keypoint R-CNN or SSD, which need
    other targets or fixed sizes) and ``fasterrcnn_tiny``."""
    import torchvision

    return sorted(
        [
            n
            for n in torchvision.models.list_models(module=torchvision.models.detection)
            if not n.startswith(("keypointrcnn", "ssd"))
        ]
        + ["fasterrcnn_tiny"]
    )


def check_model_name(name: str) -> None:
    if name not in model_names():
        import difflib

        close = difflib.get_close_matches(name, model_names(), n=3)
        raise UsageError(
            f"model.name={name!r} is not a detection model this example builds; expected one of "
            f"{', '.join(model_names())}" + (f" (closest: {', '.join(close)})" if close else "")
        )


def build_model(m: Any, num_classes: int) -> nn.Module:
    """A torchvision detection model by name with ``num_classes`` (background included). No download
    unless ``backbone_weights`` names torchvision weights; local files load with a report."""
    import torchvision

    check_model_name(m.name)
    kwargs = dict(m.kwargs)
    if m.min_size is not None:
        kwargs["min_size"] = m.min_size
    if m.max_size is not None:
        kwargs["max_size"] = m.max_size
    if m.name == "fasterrcnn_tiny":
        model = fasterrcnn_tiny(num_classes, width=m.width, **kwargs)
    else:
        backbone = None
        if m.backbone_weights is not None and not _is_path(m.backbone_weights):
            backbone = m.backbone_weights  # a torchvision weights name: torchvision downloads or reads its cache
        model = torchvision.models.get_model(
            m.name, weights=None, weights_backbone=backbone, num_classes=num_classes, **kwargs
        )
        if m.backbone_weights is not None and backbone is None:
            _load_local(model.backbone.body, m.backbone_weights, "model.backbone_weights")
    if m.weights is not None:
        _load_local(model, m.weights, "model.weights")
    return model


def _is_path(value: str) -> bool:
    return (
        "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(value).exists()
    )


def _load_local(module: nn.Module, path: str, key: str) -> None:
    """Load a local state_dict (or a checkpoint holding one under "model") into ``module``: keys are
    matched with common prefixes removed, tensors of another shape (a class head) are skipped, logged."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{key}={path!r}: no such file; give a local .pt/.pth state_dict (no download happens)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    own = module.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in ("", "module.", "features.", "backbone.body.", "backbone."):
        cand = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
        if len(cand) > len(best):
            best = cand
    fits = {k: v for k, v in best.items() if v.shape == own[k].shape}
    skipped = sorted(set(best) - set(fits))
    if not fits:
        raise UsageError(
            f"{key}={path!r}: none of its {len(state)} tensors match the model's names; is it a "
            f"state_dict for this architecture? (e.g. its keys: {list(state)[:3]})"
        )
    module.load_state_dict(fits, strict=False)
    log.info(
        "%s: loaded %d of %d tensors from %s%s",
        key,
        len(fits),
        len(own),
        file,
        f"; skipped {len(skipped)} with another shape: {skipped[:4]}" if skipped else "",
    )


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

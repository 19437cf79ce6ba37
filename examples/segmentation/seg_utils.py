"""Data, sampling, model, loss and Dice for examples/segmentation/train.py.

In one file beside the loop, so that train.py reads top to bottom:

- ``read_task``: a Medical Segmentation Decathlon task (``dataset.json``, ``imagesTr/``, ``labelsTr/``) as
  case lists, with errors that name the file and the fix; ``split_cases``: the train/val split by case,
  deterministic by seed, the same on every rank.
- ``preprocess``: a case read with nibabel, turned to the closest canonical (RAS) orientation,
  intensity-normalised, and cached as ``.npy`` slices-first so every rank and loader worker memory-maps
  it; ``SliceDataset``: the 2D slices of those volumes, with random crops and flips for training.
- ``limited_dataset``: with ``data.limit``, only the volumes that hold the first N slices are read.
- ``UNet``, ``dice_ce_loss`` / ``ce_loss`` (``LOSSES``), ``confusion`` (``confusion_per_sample``) and
  ``dice_scores``: the model, its loss, and Dice per class from summed counts (exact across ranks).
- ``size_rule``: this example's check for ``ratlib doctor`` and the start-up findings (``EXAMPLE["checks"]``).

Sampling is ratlib's (``ratlib.data``): every training slice once per epoch across ranks, each
validation slice on one rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ratlib import get_logger, main_process_first
from ratlib.config_defaults import Finding
from ratlib.errors import RatlibError
from ratlib.synthetic import make_msd_segmentation

log = get_logger(__name__)

CACHE_VERSION = 1  # bump when preprocess() changes what it writes


class TaskError(RatlibError, ValueError):
    """A Decathlon task that cannot be read as given: the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------
# The task: dataset.json and its cases


@dataclass(frozen=True)
class Case:
    name: str  # file name without .nii.gz, e.g. spleen_19
    image: Path
    label: Path


@dataclass(frozen=True)
class Task:
    root: Path
    name: str
    modalities: list[str]  # by channel, from dataset.json "modality"
    class_names: list[str]  # by label value, from dataset.json "labels" (0: background)
    cases: list[Case]  # training cases (with labels), sorted by name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_task(root: str | os.PathLike[str]) -> Task:
    """The labelled cases of the Decathlon task in ``root``, from its ``dataset.json`` (never a glob of
    ``imagesTr/``: the Decathlon's archives hold macOS ``._*`` files there)."""
    root = Path(root).expanduser()
    path = root / "dataset.json"
    if not path.is_file():
        near = sorted(p.parent.name for p in root.glob("*/dataset.json")) if root.is_dir() else []
        hint = (
            f"; these folders under it are tasks: {', '.join(near[:5])} (set data.root to one of them)"
            if near
            else "; data.root is the task folder (e.g. /data/Task09_Spleen) that holds dataset.json, imagesTr/ "
            "and labelsTr/"
        )
        raise TaskError(f"{path} not found{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TaskError(f"{path}: cannot be read as JSON ({exc}); restore the task's dataset.json") from None
    problems = [k for k in ("labels", "modality", "training") if not isinstance(meta.get(k), (dict, list))]
    if problems:
        raise TaskError(
            f"{path}: no {', '.join(problems)} entr{'ies' if len(problems) > 1 else 'y'}; a Decathlon "
            "dataset.json has 'modality', 'labels' and 'training' (a list of image/label pairs)"
        )
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        modalities = [str(meta["modality"][k]) for k in sorted(meta["modality"], key=int)]
    except (AttributeError, ValueError):
        raise TaskError(
            f'{path}: \'labels\' and \'modality\' must map numbers to names, e.g. {{"0": "background", "1": "spleen"}}'
        ) from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise TaskError(f"{path}: labels {sorted(labels)}; expected 0 (background), 1, ... without gaps")
    cases, missing = [], []
    for entry in meta["training"]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise TaskError(f"{path}: training entry {entry!r}; expected {{'image': ..., 'label': ...}}")
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        missing += [str(p) for p in (image, label) if not p.is_file()]
        cases.append(Case(image.name.removesuffix(".gz").removesuffix(".nii"), image, label))
    if missing:
        raise TaskError(
            f"{path} lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}; extract the "
            "whole task archive (imagesTr/ and labelsTr/) next to dataset.json"
        )
    if not cases:
        raise TaskError(f"{path}: 'training' is empty; a task needs labelled cases to train on")
    return Task(
        root,
        str(meta.get("name", root.name)),
        modalities,
        [labels[i] for i in range(len(labels))],
        sorted(cases, key=lambda c: c.name),
    )


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Train and validation cases: by case (slices of one patient never straddle the split), shuffled
    by ``seed`` from the sorted list, so every rank and every rerun gets the same split."""
    if len(cases) < 2:
        raise TaskError(f"{len(cases)} labelled case(s); the train/validation split needs at least 2")
    order = sorted(cases, key=lambda c: c.name)
    random.Random(f"ratlib-msd-split/{seed}").shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    return sorted(order[n_val:], key=lambda c: c.name), sorted(order[:n_val], key=lambda c: c.name)


# ----------------------------------------------------------------------------------------------
# Reading, normalising and caching volumes


def normalise(image: np.ndarray, mode: str, window: Sequence[float]) -> np.ndarray:
    """Per channel (axis 0): ``zscore`` clips to the 0.5-99.5 percentiles and standardises (MR, and
    CT without air); ``window`` clips to ``window`` (e.g. an abdominal CT window) and scales to [-1, 1]."""
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        if mode == "window":
            lo, hi = float(window[0]), float(window[1])
            out[c] = (np.clip(x, lo, hi) - lo) / (hi - lo) * 2 - 1
        else:
            lo, hi = np.percentile(x, [0.5, 99.5])
            x = np.clip(x, lo, hi)
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-6)
    return out


def _load_case(case: Case, num_classes: int, num_modalities: int) -> tuple[np.ndarray, np.ndarray]:
    """(image as (C, X, Y, Z) float, label as (X, Y, Z) uint8), both in the closest canonical orientation."""
    import nibabel as nib

    try:
        image_nii = nib.as_closest_canonical(nib.load(case.image))
        label_nii = nib.as_closest_canonical(nib.load(case.label))
        image = np.asarray(image_nii.dataobj, dtype=np.float32)
        label = np.asarray(label_nii.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise TaskError(
            f"case {case.name}: cannot read {case.image} / {case.label} ({type(exc).__name__}: {exc}); "
            "re-extract the task"
        ) from exc
    image = image[None] if image.ndim == 3 else np.moveaxis(image, -1, 0)  # 4D: modality is the last axis
    if image.shape[0] != num_modalities or image.shape[1:] != label.shape:
        raise TaskError(
            f"case {case.name}: image {case.image} has shape {image_nii.shape}, label {case.label} "
            f"{label.shape}; expected the same voxels and {num_modalities} modality channel(s) as "
            "dataset.json's 'modality' lists"
        )
    if not np.allclose(image_nii.affine, label_nii.affine, atol=1e-3):
        log.warning("case %s: the image and label affines differ; the voxels are used as they are", case.name)
    values = np.unique(label)
    if values.min() < 0 or values.max() >= num_classes or not np.all(values == np.round(values)):
        raise TaskError(
            f"case {case.name}: label values {values.tolist()[:10]} in {case.label}; dataset.json's "
            f"'labels' allows 0 to {num_classes - 1}"
        )
    return image, label.astype(np.uint8)


def preprocess(
    case: Case, cache_dir: Path, num_classes: int, num_modalities: int, mode: str, window: Sequence[float]
) -> tuple[Path, Path]:
    """The case's cached ``.npy`` files (image ``(Z, C, X, Y)`` float32, label ``(Z, X, Y)`` uint8):
    written once (atomically) when missing; the name holds a hash of the source files and settings, so
    a changed file or setting makes a new cache entry instead of reading a stale one."""
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (case.image, case.label)]
    key = hashlib.sha1(
        json.dumps([CACHE_VERSION, stats, mode, list(window) if mode == "window" else None]).encode()
    ).hexdigest()[:12]
    image_path, label_path = cache_dir / f"{case.name}-{key}.image.npy", cache_dir / f"{case.name}-{key}.label.npy"
    if image_path.is_file() and label_path.is_file():
        return image_path, label_path
    image, label = _load_case(case, num_classes, num_modalities)
    image = normalise(image, mode, window)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path, array in (
        (image_path, np.ascontiguousarray(np.moveaxis(image, -1, 0))),
        (label_path, np.ascontiguousarray(np.moveaxis(label, -1, 0))),
    ):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    return image_path, label_path


# ----------------------------------------------------------------------------------------------
# 2D slices


class SliceDataset(torch.utils.data.Dataset):
    """The axial slices of preprocessed volumes as ``(image (C, H, W) float32, label (H, W) int64, index)``.

    ``volumes``: ``(image.npy, label.npy)`` pairs from :func:`preprocess`, memory-mapped on first use in
    each process. ``limit`` keeps the first N slices (volume by volume, slice by slice). Training
    (``train=True``): ``empty_slices`` is the share of slices without foreground that is kept (chosen
    by ``seed``); items are fetched by ``(index, augmentation seed)`` keys (see ``ShardedBatchSampler``)
    and get a random crop to ``patch_size`` (padding first when a slice is smaller) and random flips
    along both axes, drawn from that seed, so augmentation is the same with any number of loader
    workers and after a resume.
    """

    def __init__(
        self,
        volumes: Sequence[tuple[Path, Path]],
        *,
        train: bool,
        limit: int | None = None,
        patch_size: Sequence[int] | None = None,
        flip: bool = True,
        empty_slices: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.volumes = list(volumes)
        self.train, self.flip = train, flip
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self._arrays: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.volumes)
        index: list[tuple[int, int]] = []
        rng = random.Random(f"ratlib-msd-slices/{seed}")
        self.dropped_empty = 0
        for v in range(len(self.volumes)):
            label = self._volume(v)[1]
            has_fg = label.reshape(label.shape[0], -1).max(axis=1) > 0
            for z in range(label.shape[0]):
                if train and not has_fg[z] and empty_slices < 1.0 and rng.random() >= empty_slices:
                    self.dropped_empty += 1
                    continue
                index.append((v, z))
        self.total = len(index)
        self.index = index[:limit] if limit is not None else index
        if not self.index:
            raise TaskError(
                f"no slices to {'train' if train else 'validate'} on ({len(self.volumes)} volumes, "
                f"data.limit={limit}, data.empty_slices={empty_slices})"
            )
        self._arrays = [None] * len(self.volumes)  # opened again in each loader worker

    def _volume(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays[v]
        if arrays is None:
            image_path, label_path = self.volumes[v]
            arrays = self._arrays[v] = (np.load(image_path, mmap_mode="r"), np.load(label_path, mmap_mode="r"))
        return arrays

    @property
    def in_channels(self) -> int:
        return int(self._volume(0)[0].shape[1])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        v, z = self.index[index]
        image_vol, label_vol = self._volume(v)
        image, label = np.array(image_vol[z], dtype=np.float32), np.array(label_vol[z], dtype=np.int64)  # copies
        if self.train and aug_seed is not None:
            rng = np.random.default_rng(aug_seed)
            if self.patch_size is not None:
                image, label = _random_crop(image, label, self.patch_size, rng)
            if self.flip:
                for axis in (0, 1):
                    if rng.random() < 0.5:
                        image, label = np.flip(image, axis + 1), np.flip(label, axis)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label)), index


def _random_crop(
    image: np.ndarray, label: np.ndarray, size: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    h, w = label.shape
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph or pw:  # pad a small slice (image with its minimum, label as ignored)
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.pad(image, ((0, 0), *pads), constant_values=float(image.min()))
        label = np.pad(label, pads, constant_values=-1)
        h, w = label.shape
    y, x = int(rng.integers(0, h - size[0] + 1)), int(rng.integers(0, w - size[1] + 1))
    return image[:, y : y + size[0], x : x + size[1]], label[y : y + size[0], x : x + size[1]]


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]], multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack slices, padded to a common size that is a multiple of ``multiple`` (the UNet halves the
    size ``num_blocks - 1`` times): images with zeros, labels with -1, which loss and Dice ignore."""
    h = max(x[1].shape[0] for x in batch)
    w = max(x[1].shape[1] for x in batch)
    h, w = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    dtype = torch.get_default_dtype()  # float32, unless a test asks for float64
    images = torch.zeros((len(batch), batch[0][0].shape[0], h, w), dtype=dtype)
    labels = torch.full((len(batch), h, w), -1, dtype=torch.int64)
    for i, (image, label, _) in enumerate(batch):
        images[i, :, : image.shape[1], : image.shape[2]] = image
        labels[i, : label.shape[0], : label.shape[1]] = label
    return images, labels, torch.tensor([x[2] for x in batch], dtype=torch.int64)


def limited_dataset(
    cases: list[Case],
    prep: Callable[[Case], tuple[Path, Path]],
    limit: int | None,
    make: Callable[[list[tuple[Path, Path]]], SliceDataset],
) -> tuple[SliceDataset, int]:
    """Preprocess a split's cases in order and build its dataset; returns it and the number of cases read.
    With ``data.limit`` the cases after the first ``limit`` slices are never read or preprocessed: a smoke
    run on a real task costs a volume or two, not the whole task. The slices are the same as with every case
    read (``SliceDataset`` picks them volume by volume, in order)."""
    volumes: list[tuple[Path, Path]] = []
    raw = 0  # slices in the volumes read so far, before empty slices are dropped
    for case in cases:
        volumes.append(prep(case))
        raw += int(np.load(volumes[-1][1], mmap_mode="r").shape[0])
        if limit is not None and raw >= limit and len(volumes) < len(cases):
            try:
                dataset = make(volumes)
            except TaskError:  # every slice read so far dropped as empty: read on
                continue
            if len(dataset) >= limit:
                return dataset, len(volumes)
    return make(volumes), len(volumes)


# ----------------------------------------------------------------------------------------------
# The data sets train.py trains and validates on


def resolve_task(cfg: Any, run_dir: Path) -> Task:
    """The task under ``data.root``, or the synthetic default written into the run folder (by the main
    rank first; rewritten when the synthetic settings changed)."""
    root = cfg.data.root
    if root is None:
        root = run_dir / "data"
        s = cfg.data.synthetic
        wanted = {"num_cases": s.num_cases, "shape": list(s.shape), "num_classes": s.num_classes, "seed": s.seed}
        with main_process_first():
            try:
                have = json.loads((root / "dataset.json").read_text())["generator_args"]
            except (OSError, ValueError, KeyError, TypeError):
                have = {}
            if {k: have.get(k) for k in wanted} != wanted:
                make_msd_segmentation(root, s.num_cases, s.shape, s.num_classes, s.seed)
                log.info(
                    "wrote a synthetic Decathlon task (%d cases, %d classes) under %s", s.num_cases, s.num_classes, root
                )
    return read_task(root)


def build_datasets(cfg: Any, run_dir: Path) -> tuple[Task, SliceDataset, SliceDataset]:
    """Split the task's cases, preprocess them into the cache (main rank first), and return the train and
    validation slice datasets."""
    d = cfg.data
    task = resolve_task(cfg, run_dir)
    train_cases, val_cases = split_cases(task.cases, d.val_fraction, d.split_seed)
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else run_dir / "cache"

    def prep(case: Case) -> tuple[Path, Path]:
        return preprocess(case, cache, task.num_classes, len(task.modalities), d.normalize, d.window)

    train_kwargs = {"patch_size": d.patch_size, "flip": d.flip, "empty_slices": d.empty_slices, "seed": d.split_seed}
    with main_process_first():  # rank 0 writes the cache, the others then read it
        train_set, train_read = limited_dataset(
            train_cases, prep, d.limit, partial(SliceDataset, train=True, limit=d.limit, **train_kwargs)
        )
        val_set, val_read = limited_dataset(val_cases, prep, d.limit, partial(SliceDataset, train=False, limit=d.limit))
    read = f" (data.limit={d.limit}: {train_read} and {val_read} cases read)" if d.limit is not None else ""
    log.info(
        f"task {task.name} ({task.root}): {task.num_classes} classes ({', '.join(task.class_names)}), "
        f"{len(task.modalities)} modalities; {len(train_cases)} train cases -> {len(train_set)} slices, "
        f"{len(val_cases)} val cases -> {len(val_set)} slices{read}"
    )
    return task, train_set, val_set


# ----------------------------------------------------------------------------------------------
# Model


def size_rule(cfg: Any, world_size: int) -> list[Finding]:
    """Past these sizes plain data parallelism ran out of memory: ask for DeepSpeed ZeRO (train.py registers
    this with ``register_check``)."""
    dims, blocks = cfg.model.feature_dims, cfg.model.num_blocks
    width = max(dims) if isinstance(dims, list) else dims
    if (width > 512 or blocks > 8) and not cfg.training.deepspeed.enabled:
        return [
            Finding(
                "warning",
                "model",
                f"feature_dims={dims} and num_blocks={blocks} are past the size plain data parallelism handles "
                "(feature_dims > 512 or num_blocks > 8)",
                "enable DeepSpeed ZeRO stage 2 (training.deepspeed.enabled=true, zero_stage=2), or 3 with offload=true",
            )
        ]
    return []


def widths(feature_dims: int | Sequence[int], num_blocks: int) -> list[int]:
    """Channels per level: an int doubles per level (16 -> 16, 32, 64, 128); a list is taken as given."""
    if isinstance(feature_dims, int):
        return [feature_dims * 2**i for i in range(num_blocks)]
    return list(feature_dims)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.InstanceNorm2d(channels, affine=True)


def conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    """Two (3x3 conv, norm, LeakyReLU) layers, as nnU-Net's."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        _norm(norm, cout),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        _norm(norm, cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet(nn.Module):
    """A 2D UNet: ``len(widths)`` levels (the last is the bottleneck), max-pool down, transposed
    convolution up, skip connections by concatenation, a 1x1 head to ``num_classes`` logits. Input
    sides must be multiples of ``2 ** (len(widths) - 1)`` (``pad_collate`` pads to that)."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], norm: str = "instance") -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(conv_block(cin, w, norm))
            cin = w
        self.pool = nn.MaxPool2d(2)
        levels = list(reversed(range(len(widths) - 1)))  # decoder order: deepest skip first
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.decode = nn.ModuleList(conv_block(2 * widths[i], widths[i], norm) for i in levels)
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.multiple = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, decode in zip(self.up, self.decode):
            x = decode(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# Loss and metric


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice), the Dice over the whole batch per foreground class (nnU-Net's
    batch Dice), averaged over the classes present in the batch: a class absent from every slice of
    the batch would score 0 whatever the model does (most slices show no organ), so only the
    cross-entropy speaks for it there. Pixels labelled -1 (padding) count in neither. In float32 at least."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    num_classes = logits.shape[1]
    ce = F.cross_entropy(logits, target, ignore_index=-1)
    valid = (target >= 0).unsqueeze(1)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp(min=0), num_classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + eps) / (denominator + eps)
    present = (onehot.sum(dims) > 0)[1:].float()  # no .nonzero(): no host sync
    return ce + ((1 - dice[1:]) * present).sum() / present.sum().clamp(min=1)


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy alone, the mean over the (unpadded) pixels: with equal slice sizes a mean over samples, so
    a global batch split over any number of ranks gives the same gradient (``model.loss: ce``)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(logits, target, ignore_index=-1)


LOSSES = {"dice_ce": dice_ce_loss, "ce": ce_loss}


def confusion(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``num_classes x num_classes`` pixel counts (int64; rows: truth, columns: prediction) of the samples
    in ``keep`` (a bool per sample; None: all), pixels labelled -1 left out."""
    k = logits.shape[1]
    pred = logits.argmax(dim=1)
    valid = target >= 0
    if keep is not None:
        valid &= keep.view(-1, 1, 1)
    return torch.bincount((target[valid] * k + pred[valid]), minlength=k * k).view(k, k)


def confusion_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``confusion`` for each sample of the batch: ``(batch, num_classes, num_classes)`` int64, in one
    ``bincount`` (no host sync per sample)."""
    n, k = logits.shape[0], logits.shape[1]
    pred = logits.argmax(dim=1)
    valid = target >= 0
    sample = torch.arange(n, device=target.device).view(-1, 1, 1).expand_as(target)
    flat = (sample * k + target.clamp(min=0)) * k + pred
    return torch.bincount(flat[valid], minlength=n * k * k).view(n, k, k)


def dice_scores(conf: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Dice per foreground class from a summed confusion matrix, ``2 TP / (2 TP + FP + FN)``, as
    ``dice_1``, ``dice_2``, ...; ``dice`` is their mean. A class absent from both truth and prediction
    scores 1.0 (nothing to find, nothing found)."""
    conf = np.asarray(conf, dtype=np.int64)
    out: dict[str, float] = {}
    for c in range(1, conf.shape[0]):
        tp = int(conf[c, c])
        denominator = int(conf[c, :].sum() + conf[:, c].sum())
        out[f"dice_{c}"] = 2 * tp / denominator if denominator else 1.0
    out = {"dice": float(np.mean(list(out.values()))), **out}
    return out

"""``make_coco_detection``: a small, valid COCO detection dataset that a detector learns in a minute.

Each object is a convex polygon (square, circle, triangle, ...) in one flat colour per category on a
dark background. The pixels drawn are exactly the pixels whose centres lie inside the polygon (the
rule pycocotools rasterises by), so ``bbox`` and ``area`` are measured from the drawn mask itself and
the segmentation polygon describes the same shape. Pillow and numpy are imported inside the function.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

from ratlib.coco_paths import CocoPaths, CocoSplit, annotation_filename, parse_split
from ratlib.errors import MissingDependencyError, message
from ratlib.io import write_atomic
from ratlib.synthetic._errors import SyntheticArgumentError, SyntheticOverwriteError

# (category name, RGB colour, polygon corners): distinct shapes and high-contrast colours
SHAPES: tuple[tuple[str, tuple[int, int, int], int], ...] = (
    ("square", (230, 40, 40), 4),
    ("circle", (40, 220, 60), 32),
    ("triangle", (60, 90, 240), 3),
    ("diamond", (240, 220, 40), 4),
    ("hexagon", (230, 60, 230), 6),
)
_GENERATOR = "ratlib.synthetic.make_coco_detection"
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
_ROBOFLOW = {"train": "train", "val": "valid", "test": "test"}


def _paths(root: Path, split: CocoSplit, layout: str) -> tuple[Path, Path]:
    if layout == "coco":
        return root / "annotations" / annotation_filename(split), root / split.image_folder
    if layout == "detectron2":
        return _paths(root / "coco", split, "coco")
    if layout == "roboflow":
        if split.name not in _ROBOFLOW:
            raise SyntheticArgumentError(
                message(
                    f"make_coco_detection: the roboflow layout has no {split.name} split (from {split})",
                    fix="use split train, val or test (its train/, valid/ and test/ folders)",
                )
            )
        folder = root / _ROBOFLOW[split.name]
        return folder / "_annotations.coco.json", folder
    raise SyntheticArgumentError(
        message(f"make_coco_detection: layout={layout!r} is unknown", expected="'coco', 'roboflow' or 'detectron2'")
    )


def _polygon(shape: int, x0: float, y0: float, size: float) -> list[tuple[float, float]]:
    """Corners of shape ``shape`` inside the square [x0, x0+size] x [y0, y0+size], clockwise on screen."""
    corners = SHAPES[shape][2]
    cx, cy, r = x0 + size / 2, y0 + size / 2, size / 2
    if SHAPES[shape][0] == "square":
        return [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    if SHAPES[shape][0] == "triangle":
        return [(cx, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    start = -math.pi / 2  # a diamond and a hexagon stand on a corner
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / corners), cy + r * math.sin(start + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _rasterise(poly: list[tuple[float, float]], width: int, height: int) -> Any:
    """Boolean mask of the pixels whose centres lie inside the convex polygon ``poly``."""
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    inside = np.ones((height, width), dtype=bool)
    for (ax, ay), (bx, by) in zip(poly, poly[1:] + poly[:1]):
        inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    return inside


def _rle(mask: Any) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the mask read column by column, zeros first."""
    import numpy as np

    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _sizes(image_size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not all(isinstance(v, int) and 32 <= v <= 4096 for v in (width, height)):
        raise SyntheticArgumentError(
            message(
                f"make_coco_detection: image_size={image_size!r}",
                expected="an int or a (width, height) pair of ints from 32 to 4096, e.g. 160 or (192, 128)",
            )
        )
    return width, height


def _check_args(
    num_images: int,
    num_categories: int,
    min_objects: int,
    max_objects: int,
    object_size: Any,
    crowd_fraction: float,
    empty_images: int,
    image_format: str,
) -> None:
    problems = []
    if not (isinstance(num_images, int) and num_images >= 1):
        problems.append(f"num_images={num_images!r} (expected an int >= 1)")
    if not 1 <= num_categories <= len(SHAPES):
        problems.append(
            f"num_categories={num_categories!r} (expected 1 to {len(SHAPES)}: {', '.join(s[0] for s in SHAPES)})"
        )
    if not 0 <= min_objects <= max_objects <= 20:
        problems.append(f"min_objects={min_objects!r}, max_objects={max_objects!r} (expected 0 <= min <= max <= 20)")
    try:
        lo, hi = (float(v) for v in object_size)
    except (TypeError, ValueError):
        lo, hi = -1.0, -1.0
    if not 0.05 <= lo <= hi <= 0.6:
        problems.append(
            f"object_size={object_size!r} (expected (low, high) fractions of the shorter image side, "
            "0.05 <= low <= high <= 0.6)"
        )
    if not 0.0 <= crowd_fraction <= 1.0:
        problems.append(f"crowd_fraction={crowd_fraction!r} (expected 0.0 to 1.0)")
    if not 0 <= empty_images <= num_images:
        problems.append(f"empty_images={empty_images!r} (expected 0 to num_images={num_images})")
    if image_format.lower() not in _FORMATS:
        problems.append(f"image_format={image_format!r} (expected 'png' or 'jpg')")
    if problems:
        raise SyntheticArgumentError(message("make_coco_detection: bad arguments", got="; ".join(problems)))


def _previous_run(ann_path: Path, overwrite: bool) -> list[str]:
    """Image file names an earlier ``make_coco_detection`` run listed here; refuses to replace an
    annotation file that anything else wrote."""
    if not ann_path.exists():
        return []
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
        ours = data.get("info", {}).get("generator") == _GENERATOR
    except (OSError, ValueError, AttributeError):
        data, ours = {}, False
    if not ours and not overwrite:
        raise SyntheticOverwriteError(
            message(
                f"make_coco_detection: {ann_path} exists and was not written by make_coco_detection; "
                "refusing to replace it",
                fix="choose another root, or pass overwrite=True",
            )
        )
    return (
        [im["file_name"] for im in data.get("images", []) if isinstance(im, dict) and "file_name" in im] if ours else []
    )


def _is_ours(path: Path) -> bool:
    """Whether an image file carries the mark ``make_coco_detection`` writes into its metadata (so an
    interrupted run's images are recognised and replaced, and anyone else's are not)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mark = image.info.get("Software") or image.info.get("comment") or b""
    except (OSError, UnidentifiedImageError):
        return False
    return (mark.decode("utf-8", "replace") if isinstance(mark, bytes) else str(mark)) == _GENERATOR


def _save_image(path: Path, pixels: Any, ext: str) -> None:
    """Save an RGB array atomically, marked as ours in its metadata."""
    from PIL import Image, PngImagePlugin

    image = Image.fromarray(pixels, "RGB")
    if ext == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", _GENERATOR)
        options: dict[str, Any] = {"format": "PNG", "pnginfo": info}
    else:
        options = {"format": "JPEG", "quality": 95, "subsampling": 0, "comment": _GENERATOR}
    write_atomic(path, lambda f: image.save(f, **options))


def _place(
    rng: random.Random, width: int, height: int, lo: int, hi: int, taken: list[tuple[float, float, float, float]]
) -> tuple[float, float, int] | None:
    """A free square (x0, y0, size) at least 2 px from the boxes taken, or None after 30 tries."""
    for _ in range(30):
        size = rng.randint(lo, hi)
        x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
        box = (x0 - 2, y0 - 2, x0 + size + 2, y0 + size + 2)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            taken.append(box)
            return x0, y0, size
    return None


def make_coco_detection(
    root: str | os.PathLike[str],
    split: str | CocoSplit = "train2017",
    num_images: int = 32,
    layout: str = "coco",
    seed: int = 0,
    *,
    image_size: int | tuple[int, int] = 128,
    num_categories: int = 3,
    min_objects: int = 1,
    max_objects: int = 3,
    object_size: tuple[float, float] = (0.15, 0.35),
    crowd_fraction: float = 0.0,
    empty_images: int = 0,
    image_format: str = "png",
    overwrite: bool = False,
) -> CocoPaths:
    """Write a small COCO detection dataset for ``split`` under ``root`` in ``layout`` and return its
    ``CocoPaths`` (what ``resolve_coco`` finds there).

    ``num_images`` images (``image_size``: int or (width, height)) of ``min_objects`` to ``max_objects``
    non-overlapping shapes, each ``object_size`` (fractions of the shorter side) across, one shape and
    colour per category (``num_categories`` of square, circle, triangle, diamond, hexagon). The JSON has
    images, categories and annotations with exact boxes, pixel areas, ``iscrowd`` 0 and polygon
    segmentations; ``crowd_fraction`` of the objects become crowd regions (a cluster of small shapes,
    ``iscrowd`` 1, RLE). The first ``empty_images`` images have no objects. Test splits in the coco
    and detectron2 layouts get an ``image_info_*.json`` without annotations, like COCO's own.
    Deterministic by ``seed`` and split (image i is the same whatever ``num_images``). Files are written
    atomically and images are marked in their metadata: a rerun (also after an interrupted one) replaces
    its own output, but files that anything else wrote are never replaced unless ``overwrite=True``.
    """
    try:
        import numpy as np
        import PIL  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            message("make_coco_detection: needs numpy and Pillow", got=str(exc), fix="pip install 'ratlib[detection]'")
        ) from exc

    width, height = _sizes(image_size)
    _check_args(
        num_images, num_categories, min_objects, max_objects, object_size, crowd_fraction, empty_images, image_format
    )
    s = parse_split(split)
    ann_path, image_dir = _paths(Path(root), s, layout)
    ext = "jpg" if image_format.lower() in ("jpg", "jpeg") else "png"
    names = [f"{i + 1:012d}.{ext}" for i in range(num_images)]
    old_files = _previous_run(ann_path, overwrite)
    foreign = [n for n in names if (image_dir / n).exists() and not _is_ours(image_dir / n)]
    if foreign and not overwrite:
        raise SyntheticOverwriteError(
            message(
                f"make_coco_detection: {image_dir} already holds {len(foreign)} file(s) it would replace "
                f"(e.g. {foreign[0]}) that make_coco_detection did not write",
                fix="choose another root, or pass overwrite=True",
            )
        )
    if ann_path.exists():  # no window where an old annotation file describes new images
        ann_path.unlink()
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    short = min(width, height)
    lo, hi = max(4, round(object_size[0] * short)), max(4, round(object_size[1] * short))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        image_id = index + 1
        rng = random.Random(f"ratlib-coco/{seed}/{s}/{index}")
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = rng.randint(0, 40)
        n = 0 if index < empty_images else rng.randint(min_objects, max_objects)
        taken: list[tuple[float, float, float, float]] = []
        for _ in range(n):
            crowd = rng.random() < crowd_fraction
            spot = _place(rng, width, height, round(hi * 1.2) if crowd else lo, round(hi * 1.5) if crowd else hi, taken)
            if spot is None:
                continue  # no room: fewer objects, never overlapping ones
            cat = rng.randrange(num_categories)
            x0, y0, size = spot
            if crowd:  # a crowd: 3 to 5 small shapes of one category inside the square
                polys = []
                inner: list[tuple[float, float, float, float]] = []
                for _ in range(rng.randint(3, 5)):
                    sub = _place(rng, size, size, max(4, size // 5), max(4, size // 3), inner)
                    if sub is not None:
                        polys.append(_polygon(cat, x0 + sub[0], y0 + sub[1], sub[2]))
            else:
                polys = [_polygon(cat, x0, y0, size)]
            mask = np.zeros((height, width), dtype=bool)
            for poly in polys:
                mask |= _rasterise(poly, width, height)
            if not mask.any():
                continue
            pixels[mask] = SHAPES[cat][1]
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            left, top = int(cols[0]), int(rows[0])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat + 1,
                    "bbox": [float(left), float(top), float(cols[-1] + 1 - left), float(rows[-1] + 1 - top)],
                    "area": float(mask.sum()),
                    "iscrowd": int(crowd),
                    "segmentation": _rle(mask) if crowd else [[round(v, 2) for xy in polys[0] for v in xy]],
                }
            )
        _save_image(image_dir / names[index], pixels, ext)
        images.append({"id": image_id, "file_name": names[index], "width": width, "height": height})
    for stale in sorted(set(old_files) - set(names)):  # listed by our earlier run, and still marked as ours
        if _is_ours(image_dir / stale):
            (image_dir / stale).unlink()
    data: dict[str, Any] = {
        "info": {
            "description": f"ratlib synthetic COCO detection, {s}, seed {seed}",
            "version": "1.0",
            "generator": _GENERATOR,
            "seed": seed,
            "split": str(s),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": SHAPES[i][0], "supercategory": "shape"} for i in range(num_categories)],
    }
    if ann_path.name.startswith("image_info_"):  # COCO's test splits carry no labels
        del data["annotations"]
    write_atomic(ann_path, lambda f: f.write(json.dumps(data).encode("utf-8")))
    return CocoPaths(image_dir, ann_path, s, layout)

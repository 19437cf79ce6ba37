"""``make_coco_detection``: a small, valid COCO detection dataset that a detector can learn."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ratlib.coco_paths import CocoPaths, CocoSplit, annotation_filename, parse_split

# (name, RGB colour): high contrast on a dark background, one shape per category
CATEGORIES = [("square", (230, 40, 40)), ("circle", (40, 220, 60)), ("triangle", (60, 90, 240))]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _paths(root: Path, split: CocoSplit, layout: str) -> tuple[Path, Path]:
    if layout == "coco":
        return root / "annotations" / annotation_filename(split), root / split.image_folder
    if layout == "detectron2":
        return _paths(root / "coco", split, "coco")
    if layout == "roboflow":
        folder = {"train": "train", "val": "valid", "test": "test"}.get(split.name)
        if folder is None:
            raise ValueError(f"make_coco_detection: the roboflow layout has no {split.name} split; "
                             "use train, val or test")
        return root / folder / "_annotations.coco.json", root / folder
    raise ValueError(f"make_coco_detection: layout={layout!r}; expected 'coco', 'roboflow' or 'detectron2'")


def make_coco_detection(
    root: str | os.PathLike[str],
    split: str | CocoSplit = "train2017",
    num_images: int = 32,
    layout: str = "coco",
    seed: int = 0,
    *,
    image_size: int = 128,
    max_objects: int = 3,
    crowd_fraction: float = 0.0,
    empty_images: int = 0,
) -> CocoPaths:
    """Write ``num_images`` PNG images of coloured squares, circles and triangles plus a COCO
    instances JSON (boxes, areas, iscrowd, polygon segmentations, categories) under ``root`` in
    ``layout``; deterministic by ``seed``. Loads in pycocotools; returns the ``CocoPaths`` written.

    ``empty_images`` of the images have no objects; ``crowd_fraction`` of the objects are marked crowd.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:  # pragma: no cover
        raise ImportError("make_coco_detection needs Pillow: pip install 'ratlib[detection]'") from exc
    if num_images < 1 or image_size < 32 or max_objects < 1:
        raise ValueError(f"make_coco_detection: num_images={num_images} (>= 1), image_size={image_size} (>= 32) "
                         f"and max_objects={max_objects} (>= 1) are out of range")
    s = parse_split(split)
    ann_path, image_dir = _paths(Path(root), s, layout)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{s}")
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        img = Image.new("RGB", (image_size, image_size), (rng.randint(0, 40),) * 3)
        draw = ImageDraw.Draw(img)
        n = 0 if index < empty_images else rng.randint(1, max_objects)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(n * 10):  # rejection sampling for non-overlapping objects
            if len(placed) == n:
                break
            size = rng.randint(image_size // 6, image_size // 3)
            x0, y0 = rng.randint(0, image_size - size - 1), rng.randint(0, image_size - size - 1)
            box = (x0, y0, x0 + size, y0 + size)
            if any(not (box[2] < p[0] or p[2] < box[0] or box[3] < p[1] or p[3] < box[1]) for p in placed):
                continue
            placed.append(box)
            cat = rng.randrange(len(CATEGORIES))
            colour = CATEGORIES[cat][1]
            if cat == 0:
                poly = [x0, y0, x0 + size, y0, x0 + size, y0 + size, x0, y0 + size]
                draw.rectangle(box, fill=colour)
                area = float((size + 1) ** 2)
            elif cat == 1:
                draw.ellipse(box, fill=colour)
                r, cx, cy = size / 2, x0 + size / 2, y0 + size / 2
                import math

                poly = [round(v, 2) for k in range(16) for v in (cx + r * math.cos(2 * math.pi * k / 16),
                                                                  cy + r * math.sin(2 * math.pi * k / 16))]
                area = float(math.pi * r * r)
            else:
                poly = [x0 + size / 2, y0, x0 + size, y0 + size, x0, y0 + size]
                draw.polygon([(poly[0], poly[1]), (poly[2], poly[3]), (poly[4], poly[5])], fill=colour)
                area = float(size * size / 2)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat + 1,
                "bbox": [float(x0), float(y0), float(size + 1), float(size + 1)], "area": area,
                "iscrowd": 1 if rng.random() < crowd_fraction else 0, "segmentation": [poly],
            })
        file_name = f"{image_id:06d}.png"
        img.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
    data = {
        "info": {"description": f"ratlib synthetic COCO detection ({s}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _) in enumerate(CATEGORIES)],
    }
    _atomic_write_text(ann_path, json.dumps(data))
    return CocoPaths(image_dir, ann_path, s, layout)

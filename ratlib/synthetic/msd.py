"""``make_msd_segmentation``: a small Medical Segmentation Decathlon task that a 2D UNet learns in a minute.

The layout is the Decathlon's own (``dataset.json``, ``imagesTr/``, ``labelsTr/``, optional
``imagesTs/``, gzipped NIfTI-1), so code written against it reads real tasks such as Task09_Spleen
unchanged. Each case is a volume of soft tissue with one blob-shaped "organ" per foreground class,
each class brighter than the last, plus noise and a smooth intensity drift; the label volume marks
the same voxels. Affines are scanner-like (LPS-style negative x and y, anisotropic spacing), qform and
sform are set, units are mm. numpy and nibabel are imported inside the function.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratlib.errors import MissingDependencyError, message
from ratlib.io import write_atomic
from ratlib.synthetic._errors import SyntheticArgumentError, SyntheticOverwriteError

_GENERATOR = "ratlib.synthetic.make_msd_segmentation"  # also written into each NIfTI header's descrip
_ORGANS = ("liver", "spleen", "kidney", "pancreas", "tumour", "vessel", "lesion")
# Mean intensity of background tissue and of organ class c (CT: Hounsfield units); MR gets other values.
_CT_TISSUE, _CT_STEP, _CT_NOISE = 20.0, 100.0, 15.0
_MR_TISSUE, _MR_STEP, _MR_NOISE = 300.0, 150.0, 30.0


def _check_args(
    num_cases: Any, shape: Any, num_classes: Any, num_test: Any, spacing: Any, modalities: Any
) -> tuple[int, int, int]:
    problems = []
    if not (isinstance(num_cases, int) and not isinstance(num_cases, bool) and num_cases >= 1):
        problems.append(f"num_cases={num_cases!r} (expected an int >= 1)")
    try:
        dims = tuple(int(v) for v in shape)
        ok = (
            len(dims) == 3
            and all(d == v for d, v in zip(dims, shape))
            and all(8 <= d <= 1024 for d in dims[:2])
            and 4 <= dims[2] <= 1024
        )
    except (TypeError, ValueError):
        dims, ok = (0, 0, 0), False
    if not ok:
        problems.append(
            f"shape={shape!r} (expected (x, y, z) ints: 8 to 1024 in-plane, 4 to 1024 slices, e.g. (64, 64, 16))"
        )
    if not (
        isinstance(num_classes, int) and not isinstance(num_classes, bool) and 2 <= num_classes <= len(_ORGANS) + 1
    ):
        problems.append(
            f"num_classes={num_classes!r} (expected 2 to {len(_ORGANS) + 1}, background included, "
            "as the labels of dataset.json count them)"
        )
    if not (isinstance(num_test, int) and not isinstance(num_test, bool) and num_test >= 0):
        problems.append(f"num_test={num_test!r} (expected an int >= 0)")
    try:
        sp = [float(v) for v in spacing]
        ok = len(sp) == 3 and all(0 < v < 100 for v in sp)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        problems.append(f"spacing={spacing!r} (expected three voxel sizes in mm, each > 0, e.g. (0.8, 0.8, 2.5))")
    if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) and m for m in modalities):
        problems.append(
            f"modalities={modalities!r} (expected a non-empty sequence of names, e.g. ('CT',) or ('T2', 'ADC'))"
        )
    if problems:
        raise SyntheticArgumentError(message("make_msd_segmentation: bad arguments", got="; ".join(problems)))
    return dims[0], dims[1], dims[2]


def _affine(shape: tuple[int, int, int], spacing: Sequence[float]) -> Any:
    """A scanner-like affine: x and y run against RAS (as DICOM-converted CT does), the volume's centre
    near the origin."""
    import numpy as np

    sx, sy, sz = (float(v) for v in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (shape[0] - 1) / 2, sy * (shape[1] - 1) / 2, -sz * (shape[2] - 1) / 2]
    return affine


def _blob(rng: Any, grid: Sequence[Any], shape: tuple[int, int, int]) -> Any:
    """A lumpy blob: the union of three overlapping ellipsoids around one random centre."""
    import numpy as np

    x, y, z = grid
    nx, ny, nz = shape
    centre = np.array([rng.uniform(0.3, 0.7) * nx, rng.uniform(0.3, 0.7) * ny, rng.uniform(0.35, 0.65) * nz])
    radii = np.array([rng.uniform(0.09, 0.15) * nx, rng.uniform(0.09, 0.15) * ny, rng.uniform(0.2, 0.3) * nz])
    field = np.zeros(shape, dtype=np.float64)
    for _ in range(3):
        c = centre + rng.uniform(-0.5, 0.5, 3) * radii
        r = radii * rng.uniform(0.7, 1.1, 3)
        field = np.maximum(
            field, np.exp(-(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2))
        )
    return field > math.exp(-1.0)  # inside the 1-radius surface of at least one ellipsoid


def _case(
    seed: int, kind: str, index: int, shape: tuple[int, int, int], num_classes: int, modalities: Sequence[str]
) -> tuple[Any, Any]:
    """One case: (image, label) arrays; the image is (x, y, z) for one modality, (x, y, z, m) for more."""
    import numpy as np

    rng = np.random.default_rng([seed, 0 if kind == "train" else 1, index])
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) + 0.5 for n in shape), indexing="ij")
    label = np.zeros(shape, dtype=np.uint8)
    for cls in range(1, num_classes):
        for attempt in range(30):  # organs do not overlap: a new blob goes where the others are not
            mask = _blob(rng, grid, shape)
            if attempt < 29 and (not mask.any() or (label > 0)[mask].any()):
                continue
            label[mask & (label == 0)] = cls
            break
    channels = []
    drift = np.sin(grid[0] / shape[0] * math.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, math.pi)) * np.cos(
        grid[1] / shape[1] * math.pi * rng.uniform(0.5, 1.5)
    )
    for m, name in enumerate(modalities):
        ct = name.upper() == "CT"
        tissue, step, noise = (_CT_TISSUE, _CT_STEP, _CT_NOISE) if ct else (_MR_TISSUE, _MR_STEP, _MR_NOISE)
        order = list(range(1, num_classes)) if m % 2 == 0 else list(range(num_classes - 1, 0, -1))
        image = tissue + 0.25 * step * drift + rng.normal(0.0, noise, shape)
        for rank, cls in enumerate(order, start=1):
            image[label == cls] += rank * step
        channels.append(np.clip(np.rint(image), -1024, 3071).astype(np.int16) if ct else image.astype(np.float32))
    if len(channels) == 1:
        return channels[0], label
    return np.stack([c.astype(np.float32) for c in channels], axis=-1), label


def _nifti_bytes(array: Any, affine: Any, *, intent: str | None = None) -> bytes:
    """A gzipped NIfTI-1 file (qform and sform set, mm units, our mark in descrip); the gzip header
    carries no time, so the same arrays give the same bytes."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    header = img.header
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = _GENERATOR.encode()
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    if intent is not None:
        header.set_intent(intent)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _is_ours(path: Path) -> bool:
    """Whether a NIfTI file carries the mark ``make_msd_segmentation`` writes into its header."""
    import nibabel as nib

    try:
        descrip = nib.Nifti1Image.from_filename(path).header["descrip"]  # what make_msd_segmentation writes
    except Exception:  # noqa: BLE001 - not NIfTI, truncated (an interrupted write), unreadable
        return False
    value = descrip.item() if hasattr(descrip, "item") else descrip
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)) == _GENERATOR


def _previous_run(json_path: Path, overwrite: bool) -> list[str]:
    """Files an earlier ``make_msd_segmentation`` run listed in ``dataset.json``; refuses to replace a
    ``dataset.json`` that anything else wrote (a real task, say)."""
    if not json_path.exists():
        return []
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and data.get("generator") == _GENERATOR
    except (OSError, ValueError):
        data, ours = {}, False
    if not ours and not overwrite:
        raise SyntheticOverwriteError(
            message(
                f"make_msd_segmentation: {json_path} exists and was not written by make_msd_segmentation "
                "(a real Decathlon task?); refusing to replace it",
                fix="choose another root, or pass overwrite=True",
            )
        )
    if not ours:
        return []
    files = [p for pair in data.get("training", []) if isinstance(pair, dict) for p in pair.values()]
    return [*files, *(p for p in data.get("test", []) if isinstance(p, str))]


def make_msd_segmentation(
    root: str | os.PathLike[str],
    num_cases: int = 8,
    shape: Sequence[int] = (64, 64, 16),
    num_classes: int = 3,
    seed: int = 0,
    *,
    num_test: int = 0,
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    modalities: Sequence[str] = ("CT",),
    name: str = "Synthetic",
    overwrite: bool = False,
) -> Path:
    """Write a small Medical Segmentation Decathlon task into the folder ``root`` and return it.

    ``root`` gets ``dataset.json`` (name, modality, labels, numTraining, numTest, training pairs, test
    list, as the Decathlon writes them), ``imagesTr/`` and ``labelsTr/`` with ``num_cases`` gzipped
    NIfTI volumes each (``{name}_001.nii.gz``, ...) and, with ``num_test``, ``imagesTs/``.

    ``shape``: voxels along x, y, z (z: the slice axis). ``num_classes`` counts background, like the
    ``labels`` of dataset.json: 3 gives background and two organs. Every case holds one lumpy blob per
    foreground class, the blobs not overlapping, each class a step brighter than the one before over
    soft tissue with noise and a smooth drift: CT volumes are int16 Hounsfield-like units, other
    modalities float32; two or more ``modalities`` give 4D images (x, y, z, modality) as the
    Decathlon's multi-modal tasks have. Labels are uint8 with the image's affine (``spacing`` in mm,
    x and y flipped as scanner data is; qform and sform set).

    Deterministic by ``seed``: case i is the same whatever ``num_cases``, and the files are the same
    bytes. Files are written atomically and marked in their header (``descrip``); ``dataset.json`` is
    written last, so its presence means the task is complete. A rerun over its own output (also an
    interrupted one) replaces it; files anything else wrote are refused unless ``overwrite=True``.
    """
    try:
        import nibabel  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            message("make_msd_segmentation: needs numpy and nibabel", got=str(exc), fix="pip install 'ratlib[medical]'")
        ) from exc

    dims = _check_args(num_cases, shape, num_classes, num_test, spacing, modalities)
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise SyntheticArgumentError(
            message(f"make_msd_segmentation: name={name!r}", expected="letters, digits and '_', e.g. 'Spleen'")
        )
    root = Path(root)
    json_path = root / "dataset.json"
    prefix = name.lower()
    train_names = [f"{prefix}_{i + 1:03d}.nii.gz" for i in range(num_cases)]
    test_names = [f"{prefix}_{num_cases + i + 1:03d}.nii.gz" for i in range(num_test)]
    targets = [root / d / n for d in ("imagesTr", "labelsTr") for n in train_names] + [
        root / "imagesTs" / n for n in test_names
    ]
    old_files = _previous_run(json_path, overwrite)
    foreign = [p for p in targets if p.exists() and not _is_ours(p)]
    if foreign and not overwrite:
        raise SyntheticOverwriteError(
            message(
                f"make_msd_segmentation: {root} already holds {len(foreign)} file(s) it would replace "
                f"(e.g. {foreign[0].relative_to(root)}) that make_msd_segmentation did not write",
                fix="choose another root, or pass overwrite=True",
            )
        )
    if json_path.exists():  # no window where an old dataset.json describes new volumes
        json_path.unlink()
    for folder in ("imagesTr", "labelsTr", *(("imagesTs",) if num_test else ())):
        (root / folder).mkdir(parents=True, exist_ok=True)

    affine = _affine(dims, spacing)
    for index, file in enumerate(train_names):
        image, label = _case(seed, "train", index, dims, num_classes, modalities)
        write_atomic(root / "imagesTr" / file, _nifti_bytes(image, affine))
        write_atomic(root / "labelsTr" / file, _nifti_bytes(label, affine, intent="label"))
    for index, file in enumerate(test_names):
        image, _ = _case(seed, "test", index, dims, num_classes, modalities)
        write_atomic(root / "imagesTs" / file, _nifti_bytes(image, affine))

    listed = {f"./{p.relative_to(root).as_posix()}" for p in targets}
    for stale in sorted(set(old_files) - listed):  # listed by our earlier run, and still marked as ours
        path = (root / stale).resolve()
        if path.is_relative_to(root.resolve()) and path.exists() and _is_ours(path):
            path.unlink()
    data: dict[str, Any] = {
        "name": name,
        "description": f"ratlib synthetic segmentation task: {num_classes - 1} blob-shaped organ class(es), "
        f"seed {seed}",
        "reference": "ratlib",
        "licence": "CC0 1.0",
        "release": "1.0",
        "tensorImageSize": "3D" if len(modalities) == 1 else "4D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"0": "background", **{str(c): _ORGANS[c - 1] for c in range(1, num_classes)}},
        "numTraining": num_cases,
        "numTest": num_test,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in train_names],
        "test": [f"./imagesTs/{n}" for n in test_names],
        "generator": _GENERATOR,
        "generator_args": {
            "num_cases": num_cases,
            "shape": list(dims),
            "num_classes": num_classes,
            "seed": seed,
            "num_test": num_test,
            "spacing": [float(v) for v in spacing],
            "modalities": list(modalities),
            "name": name,
        },
    }
    write_atomic(json_path, (json.dumps(data, indent=4) + "\n").encode("utf-8"))
    return root

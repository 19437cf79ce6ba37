"""Small datasets in real formats, for demos and tests.

- :func:`make_coco_detection`: COCO-format images + instances JSON (loads in pycocotools).
- :func:`make_msd_segmentation`: a Medical Segmentation Decathlon task (``dataset.json``, NIfTI volumes).

Heavy dependencies (Pillow, nibabel, numpy) are imported by the functions, not at import time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_coco_detection", "make_msd_segmentation"]


def make_coco_detection(*args: Any, **kwargs: Any) -> Any:
    from ratlib._synthetic_coco import make_coco_detection as impl

    return impl(*args, **kwargs)


def make_msd_segmentation(*args: Any, **kwargs: Any) -> Any:
    from ratlib._synthetic_msd import make_msd_segmentation as impl

    return impl(*args, **kwargs)


try:  # give the wrappers the real signatures and docstrings when the implementations import cleanly
    from ratlib._synthetic_coco import make_coco_detection as _coco
    from ratlib._synthetic_msd import make_msd_segmentation as _msd

    make_coco_detection.__doc__, make_msd_segmentation.__doc__ = _coco.__doc__, _msd.__doc__
    make_coco_detection.__wrapped__ = _coco  # type: ignore[attr-defined]
    make_msd_segmentation.__wrapped__ = _msd  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - an implementation not written yet
    pass

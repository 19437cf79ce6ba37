"""Small datasets in real formats, for demos and tests.

- :func:`make_coco_detection` (``ratlib.synthetic.coco``): COCO-format images + instances JSON (loads in
  pycocotools).
- :func:`make_msd_segmentation` (``ratlib.synthetic.msd``): a Medical Segmentation Decathlon task
  (``dataset.json``, NIfTI volumes).

Heavy dependencies (Pillow, nibabel, numpy) are imported by the functions, not at import time.
"""

from __future__ import annotations

from ratlib.synthetic._errors import SyntheticArgumentError, SyntheticOverwriteError
from ratlib.synthetic.coco import make_coco_detection
from ratlib.synthetic.msd import make_msd_segmentation

__all__ = ["SyntheticArgumentError", "SyntheticOverwriteError", "make_coco_detection", "make_msd_segmentation"]

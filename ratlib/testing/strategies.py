"""Hypothesis strategies for code built on ratlib (``pip install 'ratlib[dev]'``).

- :func:`coco_split_spellings`: ``(spelling, CocoSplit)`` pairs over every accepted COCO split spelling.
- :func:`coco_trees`: COCO directory trees in a temporary folder, with what should resolve.
- :func:`launch_envs`: launcher environments (valid, or single corruptions with the variable to reject).
- :func:`configs`: configs from a schema's valid space, or single corruptions with the key path to reject.

ratlib's own property tests use these same strategies.
"""

from __future__ import annotations

from ratlib.errors import MissingDependencyError, message

try:
    import hypothesis  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingDependencyError(
        message("ratlib.testing.strategies needs hypothesis, which is not installed", fix="pip install 'ratlib[dev]'")
    ) from exc

from ._coco_strategies import coco_split_spellings, coco_trees
from ._config_strategies import configs
from ._errors import StrategyArgumentError
from ._launch_strategies import launch_envs

__all__ = ["StrategyArgumentError", "coco_split_spellings", "coco_trees", "configs", "launch_envs"]

"""Test tools for projects built on ratlib.

- :func:`ratlib.testing.run_on_ranks`: run a script or function on N real gloo ranks (no pytest needed).
- ``ratlib.testing.strategies``: hypothesis strategies (needs ``pip install ratlib[dev]``).
- The pytest plugin (active once ratlib is installed) provides the ``run_on_ranks`` fixture.
"""

from __future__ import annotations

from .ranks import RankRun, free_port, run_on_ranks

__all__ = ["RankRun", "free_port", "run_on_ranks"]

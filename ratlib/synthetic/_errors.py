"""The errors of ``ratlib.synthetic``, shared by its generators."""

from __future__ import annotations

from ratlib.errors import RatlibError

__all__ = ["SyntheticArgumentError", "SyntheticOverwriteError"]


class SyntheticArgumentError(RatlibError, ValueError):
    """A generator's arguments describe no data set it can make; the message names every bad one."""


class SyntheticOverwriteError(RatlibError, FileExistsError):
    """A generator refuses to replace files it did not write (``overwrite=True`` allows it)."""

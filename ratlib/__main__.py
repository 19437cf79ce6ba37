"""``python -m ratlib``: same as the ``ratlib`` command."""

from ratlib.cli import main

raise SystemExit(main())

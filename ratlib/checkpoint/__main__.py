"""``python -m ratlib.checkpoint upgrade FILE ...``: rewrite trusted old checkpoints in the plain form.
``python -m ratlib.checkpoint consolidate DIR OUT.pt``: one full-state file from a sharded checkpoint folder."""

from __future__ import annotations

import sys

from ratlib.checkpoint.files import CheckpointError, upgrade

USAGE = (
    "usage: python -m ratlib.checkpoint upgrade FILE [FILE ...]  (rewrites trusted old checkpoints)\n"
    "       python -m ratlib.checkpoint consolidate DIR OUT.pt   (a sharded checkpoint folder as one full-state "
    "file that loads with torch.load(weights_only=True))"
)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "consolidate":
        from ratlib.checkpoint.sharded import consolidate

        try:
            out = consolidate(argv[1], argv[2])
        except CheckpointError as exc:
            print(f"ratlib.checkpoint: {exc}", file=sys.stderr)
            return 1
        print(f"consolidated {argv[1]} into {out}: it loads with torch.load(weights_only=True)")
        return 0
    if len(argv) < 2 or argv[0] != "upgrade":
        print(USAGE)
        return 2
    for name in argv[1:]:
        try:
            print(f"upgraded {upgrade(name)}: it now loads with weights_only=True")
        except CheckpointError as exc:
            print(f"ratlib.checkpoint: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

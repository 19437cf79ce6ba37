"""DCP's save planner, with each rank's shard of a large tensor written in row pieces of about 4 MiB.

DCP's reader loads a stored piece whole and then narrows it to what the rank needs. A checkpoint saved on 2
ranks and loaded on 4 would so read every shard twice over (each of the new ranks needs half of an old shard,
and reads all of it). With pieces of a few MiB along the first dimension, a rank at another world size reads
little more than its part; at the same world size it reads its shard in a few pieces instead of one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["PIECE_BYTES", "planner"]

PIECE_BYTES = 4 * 2**20

_CLASS: Any = None


def planner() -> Any:
    """A new save planner (the class is made on first use, so that importing this module needs no torch)."""
    global _CLASS
    if _CLASS is None:
        import torch
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import WriteItemType

        class PieceSavePlanner(DefaultSavePlanner):
            def create_local_plan(self) -> Any:
                plan = super().create_local_plan()
                self._pieces: dict[Any, tuple[Any, int, int]] = {}
                items = []
                for item in plan.items:
                    data = item.tensor_data
                    if item.type != WriteItemType.SHARD or data is None or len(data.chunk.sizes) == 0:
                        items.append(item)
                        continue
                    rows = int(data.chunk.sizes[0])
                    row_bytes = data.properties.dtype.itemsize * max(1, int(torch.Size(data.chunk.sizes[1:]).numel()))
                    per_piece = max(1, PIECE_BYTES // row_bytes)
                    if rows <= per_piece:
                        items.append(item)
                        continue
                    for start in range(0, rows, per_piece):
                        length = min(per_piece, rows - start)
                        offsets = torch.Size([data.chunk.offsets[0] + start, *data.chunk.offsets[1:]])
                        sizes = torch.Size([length, *data.chunk.sizes[1:]])
                        chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
                        piece = dataclasses.replace(
                            item,
                            index=MetadataIndex(item.index.fqn, offsets),
                            tensor_data=dataclasses.replace(data, chunk=chunk),
                        )
                        self._pieces[piece.index] = (item.index, start, length)
                        items.append(piece)
                self.plan = dataclasses.replace(plan, items=items)
                return self.plan

            def resolve_data(self, write_item: Any) -> Any:
                piece = self._pieces.get(write_item.index)
                if piece is None:
                    return super().resolve_data(write_item)
                whole, start, length = piece
                shard: Any = super().resolve_data(dataclasses.replace(write_item, index=whole))
                return shard.narrow(0, start, length)

        _CLASS = PieceSavePlanner
    return _CLASS()

"""Reading a sharded checkpoint's ``.metadata`` without running code from it.

``torch.distributed.checkpoint`` reads ``.metadata`` with a plain ``pickle.load``: a crafted file runs whatever
its ``__reduce__`` names inside ``dcp.load``. Here the file is read with an unpickler that admits only the
classes DCP's metadata is made of (and the few torch and builtin types they hold); anything else is refused
with a :class:`~ratlib.checkpoint.files.CheckpointError` naming what was found, before any of it is called.
:func:`reader` gives a ``FileSystemReader`` that reads its metadata so and refuses non-tensor (pickled) items,
which DCP itself would load with ``weights_only=False``. Tensor data is read with ``weights_only=True`` by DCP.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from ratlib.checkpoint._common import CheckpointError
from ratlib.errors import message

__all__ = ["METADATA", "read_metadata", "reader"]

METADATA = ".metadata"

# What DCP's metadata pickles are made of (torch 2.6 to 2.15). Classes only: no function that takes arbitrary
# arguments, no module that reaches the file system or the shell.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a lookup of torch.strided & co by name
    "torch": frozenset({"Size"}),  # and the dtypes, layouts and memory formats (checked by type below)
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _ALLOWED.get(module, frozenset()):
            return super().find_class(module, name)
        if module == "torch" and "." not in name:  # torch.float32, torch.strided, torch.contiguous_format
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise _refused(self.path, f"{module}.{name}")


def _refused(path: Path, found: str) -> CheckpointError:
    return CheckpointError(
        message(
            f"checkpoint.load: {path} is not the metadata of a torch.distributed.checkpoint checkpoint: it names "
            f"{found}, and unpickling it could run code, so nothing was loaded",
            got=f"global {found}",
            expected="only DCP's metadata classes (Metadata, TensorStorageMetadata, ...), torch.Size and dtypes",
            fix="load a checkpoint you or ratlib wrote; if this file is yours and a newer torch writes another "
            "class there, report it with the class name",
        )
    )


def read_metadata(folder: str | Path) -> Any:
    """The ``Metadata`` object of the DCP checkpoint in ``folder``, unpickled without running code."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            message(f"checkpoint.load: cannot read {path}", got=f"{type(exc).__name__}: {exc}")
        ) from exc
    try:
        metadata = _MetadataUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled pickle raises many types
        raise CheckpointError(
            message(
                f"checkpoint.load: {path} cannot be read; it is damaged or not DCP metadata",
                got=f"{type(exc).__name__}: {str(exc)[:200]}",
                fix="load an earlier checkpoint (ratlib.checkpoint.latest(folder) lists only complete ones)",
            )
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            message(f"checkpoint.load: {path} holds a {type(metadata).__name__}", expected="DCP's Metadata")
        )
    return metadata


_READER: Any = None


def reader(folder: str | Path) -> Any:
    """A ``FileSystemReader`` of ``folder`` whose metadata is read by :func:`read_metadata` and which refuses
    pickled (non-tensor) items."""
    global _READER
    if _READER is None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.planner import LoadItemType

        class SafeFileSystemReader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata = read_metadata(Path(self.path))
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                return metadata

            def read_data(self, plan: Any, planner: Any) -> Any:
                pickled = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
                if pickled:  # DCP would torch.load these with weights_only=False
                    raise _refused(Path(self.path) / METADATA, f"pickled items {pickled[:5]}")
                return super().read_data(plan, planner)

        _READER = SafeFileSystemReader
    return _READER(folder)

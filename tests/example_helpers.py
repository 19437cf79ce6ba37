"""Set-up shared by the example tests (detection, segmentation, ablation): loading a script as a module and
two fixtures. Test modules import the fixtures by name, which is how pytest picks them up."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest


def load_script(path: Path, name: str) -> ModuleType:
    """Import ``path`` (an example's train.py or run.py) as module ``name``; its sibling modules
    (seg_utils, detection_utils, ablation_utils) become importable as the script arranges."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures logging on the root logger of this process: undo that after each test."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, as each rank gets: steadier timings on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def signal_rank_1_after(module: ModuleType, step: int) -> None:
    """Wrap ``module.heartbeat`` (an example's train.py): rank 1 sends itself SIGTERM once ``step`` is done
    (its own pid only, as a signal to one non-main rank); 0 never."""
    beat: Callable[[int], None] = module.heartbeat

    def heartbeat(done: int) -> None:
        beat(done)
        if done == step and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    module.heartbeat = heartbeat

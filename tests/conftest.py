"""Shared test fixtures.

The tests mirror the source: ``unit/<area>/`` per package of ``src/clipad``, ``integration/`` for
commands and the service end to end; registry-wide and whole-tree checks stay at the top. Helpers
shared by all (``_helpers``, ``_tolerance``) live here, importable from every folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from _helpers import ...` in subfolders


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tensors gain nothing from intra-op threads, and on a busy 2-core runner
    spinning OpenMP workers make such tests several times slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

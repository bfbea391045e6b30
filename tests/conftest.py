"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["label_fixtures"]  # demo_pseudolabels: the demo's pseudolabel node, run once per session

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """Root of the small real datasets (`../shared/data`); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Every test leaves torch's intra-op thread count as it found it: float reductions (and so the bytes) of
    later tests must not depend on which tests ran before (a trainer test pins one thread, like its Ray worker).
    A test that imports torch itself and changes the count restores it (`torch_threads` below)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def torch_threads():
    """`torch_threads(n)`: set torch's intra-op thread count for the rest of the test; restored after it."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)

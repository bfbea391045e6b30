"""Shared pytest fixtures."""

from __future__ import annotations

import os
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

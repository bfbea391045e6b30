"""Fixtures for the models layer: tiny real architectures with deterministic random weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.models.clip import Clip
    from pipeline.models.sam import Sam

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_clip() -> Clip:
    """open_clip ``toy-vit`` (64 px, patch 8, D=128), random weights, seed 0."""
    from pipeline.models.clip import Clip, ClipConfig

    return Clip.build(ClipConfig(model_name="toy-vit"))


@pytest.fixture(scope="session")
def toy_sam() -> Sam:
    """segment_anything SAM ``toy`` (256 px input), random weights, seed 0."""
    from pipeline.models.sam import Sam, SamConfig

    return Sam.build(SamConfig(model_type="toy"))


@pytest.fixture(scope="session")
def toy_dinov2_script() -> ModuleType:
    """`scripts/train_toy_dinov2.py` imported as a module (its augmentation, crop and probe helpers)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "train_toy_dinov2.py"
    spec = importlib.util.spec_from_file_location("train_toy_dinov2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

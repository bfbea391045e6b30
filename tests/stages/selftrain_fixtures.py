"""Test doubles for the selftrain stage: a stand-in `train` node and a predictor with fixed logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.stage import Resources, Stage


@dataclass
class FakeModelConfig:
    resources: Resources = field(default_factory=Resources)


class FakeModelStage(Stage):
    """An unsharded node with an empty manifest: what the selftrain stage reads through port `model`."""

    kind = "fakemodel"
    schema = "fakemodel/1"
    sharded = False
    Config = FakeModelConfig

    def run_unsharded(self) -> dict[str, Any]:
        return {"num_samples": 0}


class FixedLogitsPredictor:
    """`Predictor` whose logits are the same per-class constants at every pixel, on a stride-4 grid.

    Args:
        values: one logit per class, length C.
    """

    name = "fixed"

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.num_classes = len(self.values)
        self.calls: list[tuple[int, ...]] = []

    def logits(self, pixels: Any) -> Any:
        import torch

        self.calls.append(tuple(pixels.shape))
        height, width = max(1, pixels.shape[-2] // 4), max(1, pixels.shape[-1] // 4)
        values = torch.tensor(self.values, dtype=torch.float32, device=pixels.device)
        return values[None, :, None, None].expand(1, self.num_classes, height, width).clone()

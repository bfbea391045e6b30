"""The files of a training run on any fsspec filesystem: checkpoints, the trained model's `model.pt`, the log.

Checkpoints are `<stage output>/checkpoints/step_NNNNNNN.pt` ({"step", "model": trainable state, "optimizer"}),
written by rank 0 with an atomic commit, so a killed run restarts from the newest complete one. `model.pt` is the
finished model: {"method": name, "trainable": trainable state, "config": the train node's config as JSON text},
read back by `pipeline.predict.load_trained`. Only trainable parameters are stored: frozen backbones are rebuilt
from their own weights. Everything loads with `weights_only=True`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import fsspec
import torch

from pipeline.shards import StageOutput, join, write_atomic

CHECKPOINT_PREFIX = "step_"
MODEL_FILE = "model.pt"
LOG_FILE = "train_log.jsonl"


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _torch_load(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)


class CheckpointStore:
    """Numbered checkpoints under `<url>/checkpoints/` on any fsspec filesystem."""

    def __init__(self, url: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(url)
        self.dir = join(path, "checkpoints")

    def steps(self) -> list[int]:
        """The steps that have a checkpoint, ascending."""
        if not self.fs.exists(self.dir):
            return []
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.dir, detail=False)]
        return sorted(int(n[len(CHECKPOINT_PREFIX):-3]) for n in names
                      if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".pt"))

    def path(self, step: int) -> str:
        return join(self.dir, f"{CHECKPOINT_PREFIX}{step:07d}.pt")

    def save(self, step: int, state: dict[str, Any], keep: int) -> None:
        """Commit `state` as the checkpoint of `step`, then delete all but the `keep` newest."""
        write_atomic(self.fs, self.path(step), _torch_bytes(state))
        for old in self.steps()[:-keep] if keep > 0 else []:
            self.fs.rm_file(self.path(old))

    def clear(self) -> None:
        """Delete every checkpoint (a forced re-run trains from step 0)."""
        for step in self.steps():
            self.fs.rm_file(self.path(step))

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or None when there is none."""
        steps = self.steps()
        return _torch_load(self.fs, self.path(steps[-1])) if steps else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of the trainable parameters only (frozen backbones are rebuilt from their own weights)."""
    module = getattr(model, "module", model)  # unwrap DDP
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if k in names}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `trainable_state` output; every trainable parameter must be present."""
    module = getattr(model, "module", model)
    expected = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks trainable parameters {missing[:5]} (and {max(0, len(missing) - 5)} more)")
    module.load_state_dict(state, strict=False)


def save_model(url: str, method: str, model: torch.nn.Module, config: Mapping[str, Any]) -> None:
    """Write `<url>/model.pt` atomically: the method name, `model`'s trainable state and the node config."""
    fs, path = fsspec.core.url_to_fs(url)
    artifact = {"method": method, "trainable": trainable_state(model), "config": json.dumps(config)}
    write_atomic(fs, join(path, MODEL_FILE), _torch_bytes(artifact))


def read_model(output: StageOutput) -> dict[str, Any]:
    """The `model.pt` of a finished train node: {"method", "trainable", "config" (JSON text)}."""
    return _torch_load(output.fs, join(output.path, MODEL_FILE))


def save_log(url: str, rows: list[dict[str, float]]) -> None:
    """Write `<url>/train_log.jsonl` atomically: one JSON object per logged step."""
    fs, path = fsspec.core.url_to_fs(url)
    write_atomic(fs, join(path, LOG_FILE), "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_log(url: str) -> list[dict[str, float]]:
    """The rows of `<url>/train_log.jsonl`."""
    fs, path = fsspec.core.url_to_fs(url)
    return [json.loads(line) for line in fs.cat_file(join(path, LOG_FILE)).decode().splitlines()]

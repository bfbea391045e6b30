"""Rebuild a finished train node's model from its `model.pt` for any vocabulary, as a predictor.

`model.pt` holds the method name, the trainable weights and the node's config (`pipeline.train.checkpoints`); the
`pipeline.methods.configs.MethodConfig` fields of that config rebuild the frozen backbones and the method through
`pipeline.methods.registry`, with the text classifier recomputed for the vocabulary asked about. Importing this
module does not import torch (stages import it on the driver); loading does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from pipeline.config import build_config
from pipeline.methods.configs import MethodConfig

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary
    from pipeline.shards import StageOutput


def method_config(config: dict[str, Any], node: str) -> MethodConfig:
    """The `MethodConfig` fields of a train node's config (the others, e.g. `loop`, are the trainer's)."""
    names = {f.name for f in dataclasses.fields(MethodConfig)}
    return build_config(MethodConfig, {k: v for k, v in config.items() if k in names}, node)


def load_trained(output: StageOutput, vocab: Vocabulary, device: str = "cpu", knn: bool = False) -> Any:
    """The predictor of a finished train node's model for `vocab` (`pipeline.predict.predictors.Predictor`).

    Args:
        output: the train node's output (`open_stage(<root>/<train node>)`).
        vocab: the vocabulary to predict (any: the text classifier is recomputed for it).
        device: torch device string.
        knn: IFSeg's K-NN post-processing (image-free models only; ignored by other methods).
    """
    import torch

    from pipeline.methods.registry import METHODS
    from pipeline.train.checkpoints import load_trainable_state, read_model

    artifact = read_model(output)
    cfg = method_config(json.loads(artifact["config"]), str(output.manifest.get("node", "train")))
    entry = METHODS[artifact["method"]]
    built = entry.build(cfg, vocab, torch.device(device))
    load_trainable_state(built.model, artifact["trainable"])
    return entry.predictor(built, knn)

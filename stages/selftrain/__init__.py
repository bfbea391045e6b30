"""The selftrain stage: pseudo-labels from a trained model under a named policy (see `stages.selftrain.stage`)."""

from stages.selftrain.stage import SelfTrainConfig, SelfTrainStage

__all__ = ["SelfTrainConfig", "SelfTrainStage"]

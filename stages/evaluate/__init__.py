"""The eval stage: trained models, baselines and pseudo-labels scored on a labelled split (`stages.evaluate.stage`)."""

from stages.evaluate.stage import EvalConfig, EvalStage

__all__ = ["EvalConfig", "EvalStage"]

"""CLIP + SAM pseudo-labels (Seifi et al. "FMbSeg" Stage 1): `steps` is the method, `stage` runs it over shards,
`quality` scores it against ground truth."""

from stages.pseudolabel.stage import PseudoLabelConfig, PseudoLabelStage

__all__ = ["PseudoLabelConfig", "PseudoLabelStage"]

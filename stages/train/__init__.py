"""The train stage: IFSeg, the alignment module (TSupCon) and ZegCLIP on Ray Train (see `stages.train.stage`)."""

from stages.train.stage import TrainConfig, TrainStage

__all__ = ["TrainConfig", "TrainStage"]

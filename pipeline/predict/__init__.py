"""Test-time inference shared by the selftrain and eval stages.

protocol     the test-time protocol presets (`conf/protocol/*.yaml`) and their one loader
engine       resize, whole-image or sliding-window forwards, scores at the original size
predictors   what a method kind predicts with (MaskCLIP baseline, trained models) and the kind registry
load_trained any trained model rebuilt from its `model.pt` for any vocabulary
"""

"""Method-agnostic training on Ray Train: configs, the step loop, checkpoints and model.pt, where workers run, batches.

A train stage hands `fit.fit` a picklable job; on each worker the job builds a `loop.Recipe` (model, optimiser,
loss, batches, lr schedule) and runs `loop.training_loop`, which checkpoints through `checkpoints.CheckpointStore`.
"""

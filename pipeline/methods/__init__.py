"""Method modules: the trainable parts and losses of each segmentation method.

Each module exposes one class with the small interface the trainer calls
(`Config`, `build_model`, `param_groups`, `loss`, `predict_logits`) and takes
plain tensors (text embeddings, patch features), never the model wrappers.
"""

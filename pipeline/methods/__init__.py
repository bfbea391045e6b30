"""Method modules: the trainable parts and losses of each segmentation method.

Each method module (`ifseg`, `align`, `zegclip`) exposes one class with the small interface the trainer calls
(`Config`, `build_model`, `param_groups`, `loss`, `predict_logits`) and takes plain tensors (text embeddings,
patch features), never the model wrappers. `configs` holds their torch-free typed configs; `registry` builds a
method by name, with its frozen backbone and a vocabulary's text classifier, and serves it at test time.
"""

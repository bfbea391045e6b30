"""The ZegCLIP recipe wires the release's training choices into the loop (reset at the switch, no clipping)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import build_config
from pipeline.data.vocab import load_vocab
from stages.train.recipes import RecipeInputs, zegclip_recipe
from stages.train.stage import TrainConfig


def zegclip_train_config(**zegclip: object) -> TrainConfig:
    values = {"method": "zegclip", "vocab": "toy", "prompt_templates": "single", "loop": {"steps": 10},
              "clip": {"model_name": "toy-vit", "pretrained": None},
              "zegclip": {"num_prompts": 2, "decoder_layers": 1, "decoder_heads": 4, "decoder_ffn_dim": 32, **zegclip}}
    return build_config(TrainConfig, values, "train_zegclip")


@pytest.mark.parametrize(("zegclip", "reset_at"), [({"mode": "transductive"}, 5), ({"mode": "inductive"}, None),
                                                  ({"mode": "transductive", "reset_optimizer_at_switch": False}, None),
                                                  ({"mode": "transductive", "st_start_fraction": 0.3}, 3)])
def test_zegclip_recipe_resets_the_optimiser_where_self_training_starts(zegclip, reset_at):
    cfg = zegclip_train_config(**zegclip)
    recipe = zegclip_recipe(RecipeInputs(cfg, load_vocab("toy"), {"images": None}, 0, torch.device("cpu"), 2))
    assert recipe.reset_optimizer_at == reset_at and recipe.grad_clip is None
    # the lr restarts its warmup at the same step (the release's second run): factor(reset) ~ warmup_ratio
    if reset_at is not None:
        assert recipe.lr_factor(reset_at) == pytest.approx(1e-6, rel=1e-3)
        assert recipe.lr_factor(reset_at - 1) > 1e-5

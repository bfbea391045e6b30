"""The mask decoder's two halves (`pipeline.models.sam_decoder`) against segment_anything's ``MaskDecoder``."""

from __future__ import annotations

import torch

from pipeline.models.sam import Sam
from pipeline.models.sam_decoder import decode_tokens, mask_logits


def _prompts(count: int, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    coords = torch.rand(count, points, 2, generator=generator) * 256
    labels = torch.randint(0, 2, (count, points), generator=generator)
    return coords, labels


@torch.no_grad()
def test_halves_equal_the_mask_decoder_bit_for_bit(toy_sam: Sam) -> None:
    model = toy_sam.model
    embedding = toy_sam.embed_images([torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy()]).features
    coords, labels = _prompts(6, 2, 0)
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    logits, iou = model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=True)
    tokens = decode_tokens(model, embedding, coords, labels)
    ours = mask_logits(model, tokens)
    assert ours.shape == (6, 4, 64, 64) and tokens.iou.shape == (6, 4)
    assert torch.equal(ours[:, 1:], logits) and torch.equal(tokens.iou[:, 1:], iou)  # multimask = tokens 1..3


@torch.no_grad()
def test_the_mask_head_on_a_subset_of_prompts_gives_those_prompts_logits(toy_sam: Sam) -> None:
    """What the automatic masks rely on: running the head on the IoU survivors only changes nothing for them."""
    model = toy_sam.model
    embedding = toy_sam.embed_images([torch.randint(0, 255, (64, 48, 3), dtype=torch.uint8).numpy()]).features
    coords, labels = _prompts(9, 1, 1)
    tokens = decode_tokens(model, embedding, coords, labels)
    full = mask_logits(model, tokens)
    assert torch.equal(mask_logits(model, tokens, torch.ones(9, dtype=torch.bool)), full)
    for rows in ([1, 2, 5, 8], [3], [0, 4], [0, 1, 2, 3, 4, 5, 6]):  # sizes where a per-row matmul would differ
        assert torch.equal(mask_logits(model, tokens, torch.tensor(rows)), full[rows]), rows
    assert mask_logits(model, tokens, torch.zeros(9, dtype=torch.bool)).shape == (0, 4, 64, 64)

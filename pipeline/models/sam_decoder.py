"""SAM's mask decoder in two halves, so the automatic mask generator pays for mask logits only where it keeps one.

segment_anything's ``MaskDecoder.predict_masks`` runs, for B prompts on one image embedding: (1) the two-way
transformer over [output tokens; prompt tokens] and the B copies of the image tokens, then the IoU head on the IoU
token; (2) the mask head: the transformed image tokens upscaled 4x (two transposed convolutions) and a dot product
with each mask token's hypernetwork output. The predicted IoU comes from (1) alone, so the generator's
``pred_iou_thresh`` can run between the halves and the upscaling runs only on the prompts with at least one
surviving output (on the trained toy SAM, 28 % of the 8x8 grid's prompts; the upscaling is about a fifth of the
decoder's time).

The transformer half comes in two versions: `decode_tokens` calls segment_anything's ``TwoWayTransformer`` on B
copies of the image tokens (the exact path, ``sam.shared_image_decoder: false``); `decode_tokens_shared` (the
default for the automatic generator) runs the same modules through `pipeline.models.sam_two_way`, which computes
the image side of the first block once for all B prompts and never repeats the image embedding (~3x faster on
CPU at toy and at ``vit_b`` size; equal up to float rounding, ~1e-6 in the IoUs, tests/models/test_sam_two_way.py).

The exact halves call the decoder's own submodules with the same tensors, in the same order, as ``predict_masks``.
The hypernetwork MLPs (small matmuls, whose per-row results on CPU depend on how many rows a call has) run in the
first half on all B prompts, as in ``predict_masks``; the upscaling and the final batched matmul are per-sample, so
on a subset of prompts they give bit for bit the full batch's logits (a subset of one prompt runs as two: see
`mask_logits`) (tests/models/test_sam_decoder.py; the records equal ``SamAutomaticMaskGenerator``'s,
tests/models/test_sam_masks.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class DecoderTokens:
    """The transformer half's output for B prompts (see the module docstring).

    Attributes:
        hyper: [B, T, C / 8] the hypernetwork outputs of the T = ``num_mask_tokens`` (4) mask tokens.
        image_tokens: [B, h * w, C] the image tokens after the transformer.
        iou: [B, T] predicted IoU of each mask token's mask (the IoU head).
        grid: (h, w) of the image embedding.
    """

    hyper: torch.Tensor
    image_tokens: torch.Tensor
    iou: torch.Tensor
    grid: tuple[int, int]

    def select(self, rows: torch.Tensor) -> DecoderTokens:
        """The prompts picked by `rows` (bool [B] or int indices)."""
        return DecoderTokens(self.hyper[rows], self.image_tokens[rows], self.iou[rows], self.grid)


def decode_tokens(model: torch.nn.Module, image_embedding: torch.Tensor, coords: torch.Tensor,
                  labels: torch.Tensor) -> DecoderTokens:
    """Prompt encoder, two-way transformer, IoU head and hypernetworks for B point-prompt sets on one image.

    Args:
        model: segment_anything ``Sam``.
        image_embedding: [1, C, h, w] on the model's device.
        coords: [B, P, 2] (x, y) in the encoder's input frame; labels: [B, P] (1 foreground, 0 background).
    """
    decoder = model.mask_decoder
    tokens, dense = _prompt_tokens(model, coords, labels)
    batch = tokens.shape[0]
    src = torch.repeat_interleave(image_embedding, batch, dim=0) + dense
    pos = torch.repeat_interleave(model.prompt_encoder.get_dense_pe(), batch, dim=0)
    hs, image_tokens = decoder.transformer(src, pos, tokens)
    return _heads(decoder, hs, image_tokens, (int(src.shape[2]), int(src.shape[3])))


def decode_tokens_shared(model: torch.nn.Module, image_embedding: torch.Tensor, coords: torch.Tensor,
                         labels: torch.Tensor) -> DecoderTokens:
    """`decode_tokens` with the image side of the transformer's first block computed once for all B prompts
    (`pipeline.models.sam_two_way`; equal up to float rounding, ~1e-6); arguments and output as `decode_tokens`."""
    from pipeline.models.sam_two_way import shared_image_transformer

    decoder = model.mask_decoder
    tokens, dense = _prompt_tokens(model, coords, labels)
    image = image_embedding + dense[:1]  # without a mask prompt every row of `dense` is the no-mask embedding
    transformer = (getattr(decoder.transformer, "shared_image_forward", None)  # torch.compile'd (`sam.compile`)
                   or partial(shared_image_transformer, decoder.transformer))
    hs, image_tokens = transformer(image, model.prompt_encoder.get_dense_pe(), tokens)
    return _heads(decoder, hs, image_tokens, (int(image.shape[2]), int(image.shape[3])))


def _prompt_tokens(model: torch.nn.Module, coords: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt encoder's output as ``predict_masks`` takes it: (tokens [B, T, C] = the IoU and mask output tokens
    followed by the sparse point embeddings, dense prompt embedding [B, C, h, w])."""
    decoder = model.mask_decoder
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1), dense


def _heads(decoder: torch.nn.Module, hs: torch.Tensor, image_tokens: torch.Tensor,
           grid: tuple[int, int]) -> DecoderTokens:
    """IoU head and hypernetworks on the transformer's output tokens hs [B, T, C]."""
    hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    return DecoderTokens(hyper, image_tokens, decoder.iou_prediction_head(hs[:, 0, :]), grid)


def mask_logits(model: torch.nn.Module, tokens: DecoderTokens, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The mask head: low-resolution logits [R, T, 4h, 4w] of every mask token of the prompts `rows` (bool [B] or
    int indices; None = all B), equal bit for bit to those rows of the head on all B prompts."""
    if rows is None:
        return _mask_head(model.mask_decoder, tokens)
    picked = torch.arange(len(tokens.iou), device=tokens.iou.device)[rows]
    if len(picked) == 1 < len(tokens.iou):  # the image tokens of B >= 2 prompts have channels-last strides, those of
        # one prompt are taken for contiguous: CPU convolutions then pick another kernel, so one prompt runs as two
        return _mask_head(model.mask_decoder, tokens.select(picked.repeat(2)))[:1]
    return _mask_head(model.mask_decoder, tokens.select(picked))


def _mask_head(decoder: torch.nn.Module, tokens: DecoderTokens) -> torch.Tensor:
    """``predict_masks``' upscaling and hypernetwork product on all of `tokens` -> [B, T, 4h, 4w]."""
    batch, channels = tokens.image_tokens.shape[0], tokens.image_tokens.shape[2]
    upscaled = decoder.output_upscaling(tokens.image_tokens.transpose(1, 2).view(batch, channels, *tokens.grid))
    _, up_channels, height, width = upscaled.shape
    logits = tokens.hyper @ upscaled.view(batch, up_channels, height * width)
    return logits.view(batch, tokens.hyper.shape[1], height, width)

"""SAM's two-way transformer for B point prompts on ONE image embedding, its first block's image side computed once.

segment_anything's ``MaskDecoder.predict_masks`` repeats the image embedding B times (``repeat_interleave``) and
runs ``TwoWayTransformer`` on B identical copies of the image tokens. In the first ``TwoWayAttentionBlock`` the
image side is still the same for every prompt: ``keys`` = image embedding + the no-mask dense embedding and
``key_pe`` = the dense positional encoding, both [1, N, C] (N = h * w image tokens). So, in block 1:

1. self-attention of the prompt tokens (no positional term: ``skip_first_layer_pe``), ``norm1``;
2. token-to-image attention: k_proj(keys + key_pe) and v_proj(keys) are computed once on [1, N, C], and all B * T
   token queries attend to that one K/V (the B prompts folded into the query axis); ``norm2``; MLP, ``norm3``;
3. image-to-token attention: q_proj(keys + key_pe) is computed once, and these shared image queries attend to each
   prompt's own T token keys/values; ``keys + attn_out`` (broadcast over B), ``norm4``.

From that residual on, everything is per prompt as in segment_anything (blocks 2.., the final token-to-image
attention, ``norm_final_attn``), with the positional encoding broadcast instead of repeated. Memory-bound work on
[B, N, C] is what costs on a CPU, so:

- the token attentions run through `torch.nn.functional.scaled_dot_product_attention` on head views (no head
  split/recombine copies where the layout allows);
- the image-to-token attention (N queries on ~7 token keys) takes its scores as [B, heads, T, N] so the softmax
  never runs over a last axis of 7, and folds the head merge and ``out_proj`` into one batched matmul that
  accumulates onto the residual in place (`image_to_token`);
- a projection of keys + key_pe is keys W^T + projection(key_pe), the positional term projected once on [1, N, C]
  (`project_sum`), so the [B, N, C] sum is never formed.

Same modules and weights, the same sequence of layers, residuals and norms as segment_anything; the values differ
only by float rounding (other matmul shapes and summation orders: max |diff| ~1e-6 in the IoUs and ~5e-6 x
(1 + |logit|) in the mask logits of the trained toy SAM, tests/models/test_sam_two_way.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C_i] -> [B, heads, N, C_i / heads] (a view)."""
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads * d] (a view when SDPA returned a head-minor layout, else one copy)."""
    batch, heads, tokens, depth = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * depth)


def attention(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything ``transformer.Attention`` (its projections) through SDPA: q [B, Nq, C], k and v
    [B, Nk, C] -> [B, Nq, C]."""
    return projected_attention(module, module.q_proj(q), module.k_proj(k), module.v_proj(v))


def projected_attention(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention of ``module`` on already projected q [B, Nq, C_i], k and v [B, Nk, C_i] -> [B, Nq, C]."""
    heads = module.num_heads
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    return module.out_proj(_merge(out))


def project_sum(projection: torch.nn.Linear, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """``projection(x + shared)`` for x [B, N, C] and shared [1, N, C] as x W^T + projection(shared): the [B, N, C]
    sum is never formed, the shared term is projected once (linearity; float rounding only)."""
    return torch.matmul(x, projection.weight.T).add_(projection(shared))


def image_to_token(module: Any, queries: torch.Tensor, tokens_k: torch.Tensor, tokens_v: torch.Tensor,
                   residual: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``residual`` + segment_anything ``transformer.Attention(q=image, k=tokens_k, v=tokens_v)`` of N image queries
    on T tokens, laid out for T << N.

    Args:
        module: the ``cross_attn_image_to_token`` attention.
        queries: [1 or B, N, C_i] the image queries already projected (``q_proj``; 1 = shared by all B prompts).
        tokens_k, tokens_v: [B, T, C] the tokens the keys and values are projected from.
        residual: [1 or B, N, C]; with `overwrite` (a [B, N, C] tensor of the caller's own) it receives the
            result in place.

    Returns:
        [B, N, C] residual + attention output.

    The scores of all heads come out of one matmul as [B, heads, T, N] (the keys as a block-diagonal
    [B, heads * T, C_i] matrix), so the softmax runs over T on a strided axis with N contiguous (a softmax over a
    last axis of ~7 costs more than the whole rest); the head merge and ``out_proj`` fold into one batched matmul
    ([B, N, heads * T] probabilities @ [B, heads * T, C] = each head's values times its slice of ``out_proj``),
    accumulated in place onto residual + ``out_proj.bias`` (no [B, N, C] temporary for the attention output).
    """
    heads, batch, count = module.num_heads, tokens_k.shape[0], tokens_k.shape[1]
    depth = queries.shape[-1] // heads
    keys = module.k_proj(tokens_k).view(batch, count, heads, depth) * depth ** -0.5
    eye = torch.eye(heads, dtype=keys.dtype, device=keys.device)
    block_keys = torch.einsum("bthi,hg->bhtgi", keys, eye).reshape(batch, heads * count, heads * depth)
    if queries.shape[0] == 1:  # shared image queries: one matmul for all prompts
        scores = block_keys.reshape(batch * heads * count, -1) @ queries[0].T
    else:
        scores = block_keys @ queries.transpose(1, 2)
    probs = scores.view(batch, heads, count, -1).softmax(dim=2).view(batch, heads * count, -1)
    values = module.v_proj(tokens_v).view(batch, count, heads, depth)
    weight = module.out_proj.weight.view(-1, heads, depth)
    projected = torch.einsum("bthi,chi->bhtc", values, weight).reshape(batch, heads * count, -1)
    if overwrite and residual.shape[0] == batch:
        out = residual.add_(module.out_proj.bias)
    else:
        out = (residual + module.out_proj.bias).expand(batch, -1, -1).contiguous()
    return out.baddbmm_(probs.transpose(1, 2).to(out.dtype), projected.to(out.dtype))  # in place: autocast leaves
    # the dtypes to us; the residual stream stays float32 under bf16/fp16 as in segment_anything


def first_block(block: Any, tokens: torch.Tensor, src: torch.Tensor,
                pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 1 with its image side shared (steps 1-3 of the module docstring).

    Args:
        block: the first ``TwoWayAttentionBlock`` (``skip_first_layer_pe``).
        tokens: [B, T, C] output + prompt tokens (also the query positional term).
        src, pos: [1, N, C] image tokens (embedding + dense prompt embedding) and their positional encoding.

    Returns:
        queries [B, T, C], keys [B, N, C].
    """
    if not block.skip_first_layer_pe:
        raise ValueError("the shared-image first block needs skip_first_layer_pe (TwoWayTransformer's layer 0)")
    batch, count, channels = tokens.shape
    queries = block.norm1(attention(block.self_attn, tokens, tokens, tokens))
    keys_pe = src + pos
    to_image = attention(block.cross_attn_token_to_image, (queries + tokens).reshape(1, batch * count, channels),
                         keys_pe, src)
    queries = block.norm2(queries + to_image.view(batch, count, channels))
    queries = block.norm3(queries + block.mlp(queries))
    cross = block.cross_attn_image_to_token
    keys = image_to_token(cross, cross.q_proj(keys_pe), queries + tokens, queries, src)
    return queries, block.norm4(keys)


def later_block(block: Any, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayAttentionBlock.forward`` (with the positional terms) per prompt: queries [B, T, C], keys [B, N, C]
    (overwritten: the block's input from the previous block), query_pe [B, T, C], key_pe [1, N, C] -> (queries,
    keys). The projections of keys + key_pe are `project_sum`."""
    q = queries + query_pe
    queries = block.norm1(queries + attention(block.self_attn, q, q, queries))
    to_image = block.cross_attn_token_to_image
    q = to_image.q_proj(queries + query_pe)
    queries = block.norm2(queries + projected_attention(to_image, q, project_sum(to_image.k_proj, keys, key_pe),
                                                        to_image.v_proj(keys)))
    queries = block.norm3(queries + block.mlp(queries))
    cross = block.cross_attn_image_to_token
    keys = image_to_token(cross, project_sum(cross.q_proj, keys, key_pe), queries + query_pe, queries, keys,
                          overwrite=True)
    return queries, block.norm4(keys)


def shared_image_transformer(transformer: Any, image: torch.Tensor, pos: torch.Tensor,
                             tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` for B prompts on one image (see the module docstring).

    Args:
        transformer: segment_anything ``TwoWayTransformer``.
        image: [1, C, h, w] image embedding + dense prompt embedding; pos: [1, C, h, w] dense positional encoding.
        tokens: [B, T, C] output tokens followed by the prompt tokens.

    Returns:
        (queries [B, T, C] after ``norm_final_attn``, image tokens [B, h * w, C]), as the transformer's forward.
    """
    src = image.flatten(2).transpose(1, 2).contiguous()
    pe = pos.flatten(2).transpose(1, 2).contiguous()
    queries, keys = first_block(transformer.layers[0], tokens, src, pe)
    for block in transformer.layers[1:]:
        queries, keys = later_block(block, queries, keys, tokens, pe)
    final = transformer.final_attn_token_to_image
    out = projected_attention(final, final.q_proj(queries + tokens), project_sum(final.k_proj, keys, pe),
                              final.v_proj(keys))
    return transformer.norm_final_attn(queries + out), keys

"""GPU switches of the SAM wrapper (`SamConfig.sdpa`, ``channels_last``, ``compile``, ``pin_memory``) and of the CLIP
wrapper (`ClipConfig.compile`), applied once at build time; every one also runs on CPU, so CI covers the code.
Reduced precision is the models' ``precision`` knob (`pipeline.models.precision`; CLIP: open_clip's bf16/fp16 weights).

- ``sdpa``: the attention of the image encoder and of the mask decoder's two-way transformer through
  `torch.nn.functional.scaled_dot_product_attention` (fused kernels, on CPU too), with the encoder's decomposed
  relative-position terms passed as the additive mask (as segment-anything-fast does). Equal to SAM's own attention
  up to float rounding (softmax and matmul order; max |difference| ~1e-6 in the embeddings, ~2e-7 in the decoder's
  logits and IoUs, fp32), so masks are no longer bit-equal to ``SamAutomaticMaskGenerator``'s.
- ``channels_last``: the encoder's convolutions (patch embedding, neck) in channels-last memory format.
- ``compile``: `torch.compile` of the image encoder, the mask decoder, and the decoder's two-way transformer
  (segment_anything's and the shared-image one of `pipeline.models.sam_two_way`, as
  ``transformer.shared_image_forward``) and upscaling (the halves `pipeline.models.sam_decoder` calls); first
  calls compile; shapes vary with the number of prompts, so ``dynamic=None`` lets torch recompile with dynamic
  shapes after the first change.
- ``pin_memory``: host images are page-locked before their copy to a CUDA device (`host_to_device`); the only switch
  that cannot change a value, so the only one outside the fingerprint (`pipeline.fingerprint.RESOURCE_KEYS`).
- CLIP ``compile``: `torch.compile` of each block of the image tower (what `pipeline.models.clip_dense` runs before its
  dense last block). CLIP's attention needs no SDPA switch: ``nn.MultiheadAttention`` without weights already calls
  ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import types
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.models.sam_two_way import shared_image_transformer


def sdpa_attention_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """segment_anything ``image_encoder.Attention.forward`` with SDPA: x [B, H, W, C] -> [B, H, W, C]."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, height * width, -1).unbind(0)
    bias = None
    if self.use_rel_pos:
        zeros = torch.zeros(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        bias = add_decomposed_rel_pos(zeros, q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out)


def sdpa_decoder_attention_forward(self: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything ``transformer.Attention.forward`` with SDPA: q [B, Nq, C], k and v [B, Nk, C] -> [B, Nq, C]."""
    heads = [self._separate_heads(proj(x), self.num_heads) for proj, x in ((self.q_proj, q), (self.k_proj, k),
                                                                          (self.v_proj, v))]
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(*heads)))


def accelerate_sam(model: torch.nn.Module, sdpa: bool, channels_last: bool, compile_model: bool) -> None:
    """Apply the switches to a built segment_anything ``Sam`` in place (see the module docstring)."""
    from segment_anything.modeling.image_encoder import Attention
    from segment_anything.modeling.transformer import Attention as DecoderAttention

    if sdpa:
        for module in model.image_encoder.modules():
            if isinstance(module, Attention):
                module.forward = types.MethodType(sdpa_attention_forward, module)
        for module in model.mask_decoder.modules():
            if isinstance(module, DecoderAttention):
                module.forward = types.MethodType(sdpa_decoder_attention_forward, module)
    if channels_last:
        model.image_encoder.to(memory_format=torch.channels_last)
    if compile_model:
        model.image_encoder.forward = torch.compile(model.image_encoder.forward)
        decoder = model.mask_decoder
        for module in (decoder, decoder.transformer, decoder.output_upscaling):
            module.forward = torch.compile(module.forward)
        decoder.transformer.shared_image_forward = torch.compile(partial(shared_image_transformer,
                                                                         decoder.transformer))


def host_to_device(array: Any, device: torch.device, pin_memory: bool) -> torch.Tensor:
    """A numpy array as a tensor on `device`; page-locked and copied asynchronously when `pin_memory` and CUDA."""
    tensor = torch.as_tensor(array)
    if pin_memory and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def accelerate_clip(model: torch.nn.Module, compile_model: bool) -> None:
    """Apply `ClipConfig.compile` to a built open_clip model in place (see the module docstring)."""
    if compile_model:
        for block in model.visual.transformer.resblocks:
            block.forward = torch.compile(block.forward)

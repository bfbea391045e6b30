"""The ZSSeg eval predictor: SAM proposals, each masked crop classified by CLIP with the learned prompts, assembled
per pixel (methods-spec §2.1 Stage C, with SAM in place of the paper's MaskFormer proposal network).

For an image of h x w pixels: SAM's automatic masks, kept when area >= `min_mask_area` and predicted IoU >=
`min_predicted_iou`, plus the pixels no kept mask covers as one more proposal (`with_remainder`); p_CLIP of each
proposal over the whole vocabulary with the learned text features; ``scores[c] = Σ_q p_q(c) · mask_q``. There is
no MaskFormer class branch here, so the λ ensemble reduces to p_CLIP (CLIP only); the pseudolabel stage's crop
labeller ensembles with a trained model's probabilities when given one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.methods.zsseg_crops import assemble, crop_probabilities, with_remainder


class ZSSegPredictor:
    """`pipeline.predict.predictors.Predictor` of a trained zsseg model (`BuiltMethod` with the learned ctx loaded).

    `logits(pixels [1, 3, h, w] in [0, 1]) -> float32 [1, C, h, w]` proposal-assembled class scores (in [0, N]).
    """

    def __init__(self, built: Any, knn: bool = False) -> None:
        self.clip, self.method, self.model = built.backbone, built.method, built.model.eval()
        self.cfg = self.method.cfg
        with torch.no_grad():
            self.text = self.model(self.method.names).cpu()
        self.name, self.num_classes = "zsseg", int(self.text.shape[0])
        self._sam: Any = None

    @property
    def sam(self) -> Any:
        """The proposal generator, built on first use (training never needs it)."""
        if self._sam is None:
            import dataclasses

            from pipeline.models.sam import Sam

            self._sam = Sam.build(dataclasses.replace(self.cfg.sam, device=str(self.clip.device)))
        return self._sam

    def proposals(self, image: np.ndarray) -> np.ndarray:
        """bool [N, h, w]: the kept SAM automatic masks of uint8 [h, w, 3] `image`, plus the uncovered rest."""
        from pipeline.models.sam_masks import automatic_masks_with_arrays

        records, masks = automatic_masks_with_arrays(self.sam, image, self.cfg.amg)
        keep = [i for i, r in enumerate(records)
                if r["area"] >= max(1, self.cfg.min_mask_area) and r["predicted_iou"] >= self.cfg.min_predicted_iou]
        return with_remainder(masks[keep].astype(bool), image.shape[:2])

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        image = (pixels[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        masks = self.proposals(image)
        probs = crop_probabilities(self.clip, image, masks, self.text, self.cfg.logit_scale,
                                   self.clip.cfg.image_batch_size)
        return torch.from_numpy(assemble(probs, masks))[None].to(pixels.device)

"""Text prompt templates as data, and lookup by name.

Each template has one ``{}`` placeholder for the class name. Ensembling (per-template L2 normalisation, mean over
templates, renormalisation) is done by `pipeline.models.clip.Clip.encode_text`.

Sources (verbatim strings, including their punctuation quirks):

* ``single``: ``"a photo of a {}."``, the single template of Seifi et al. (FMbSeg) and ZegCLIP's single-template
  embeddings (ZegCLIP's notebook omits the final period; the difference is kept out of the default on purpose:
  pass a custom tuple if it matters).
* ``zegclip15``: ZegCLIP App. C / ``configs/_base_/datasets/text_embedding/get_embedding.ipynb`` (15 templates).
* ``maskclip85``: MaskCLIP ``tools/maskclip_utils/prompt_engineering.py::prompt_templates``: the 80 CLIP ImageNet
  templates + 5 "... in the scene" ones; used by IFSeg App. D for CLIP sentence features.
* ``vild14``: ZSSeg ``mask_former/modeling/clip_adapter/utils.py::CLIP.VILD_PROMPT`` (14; some lack a period).
* ``imagenet80``: the first 80 of ``maskclip85`` (= ZSSeg ``CLIP.IMAGENET_PROMPT``).
* ``sculpture``: ZSSeg's best single ImageNet template ``"a sculpture of a {}."``.
"""

from __future__ import annotations

SINGLE: tuple[str, ...] = ("a photo of a {}.",)

SCULPTURE: tuple[str, ...] = ("a sculpture of a {}.",)

ZEGCLIP_15: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)

ZSSEG_VILD_14: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

MASKCLIP_85: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
IMAGENET_80: tuple[str, ...] = MASKCLIP_85[:80]

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": SINGLE,
    "sculpture": SCULPTURE,
    "zegclip15": ZEGCLIP_15,
    "maskclip85": MASKCLIP_85,
    "imagenet80": IMAGENET_80,
    "vild14": ZSSEG_VILD_14,
}


def get_templates(name: str) -> tuple[str, ...]:
    """Template tuple registered under `name` (one of `TEMPLATE_SETS`).

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        return TEMPLATE_SETS[name]
    except KeyError:
        raise KeyError(f"unknown prompt template set {name!r}; known: {sorted(TEMPLATE_SETS)}") from None

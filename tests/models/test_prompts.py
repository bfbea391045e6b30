"""Prompt template sets: exact sizes and well-formedness."""

from __future__ import annotations

import pytest

from pipeline.models import prompts


@pytest.mark.parametrize(
    ("name", "length"),
    [("single", 1), ("sculpture", 1), ("zegclip15", 15), ("maskclip85", 85), ("imagenet80", 80), ("vild14", 14)],
)
def test_template_set_sizes(name: str, length: int) -> None:
    templates = prompts.get_templates(name)
    assert len(templates) == length
    assert len(set(templates)) == length
    assert all(t.count("{}") == 1 for t in templates)


def test_known_members() -> None:
    assert prompts.SINGLE == ("a photo of a {}.",)
    assert prompts.MASKCLIP_85[:80] == prompts.IMAGENET_80
    assert all("in the scene" in t for t in prompts.MASKCLIP_85[80:])
    assert prompts.MASKCLIP_85[0] == "a bad photo of a {}."
    assert prompts.ZEGCLIP_15[-1] == "This is one {} in the scene."
    assert prompts.ZSSEG_VILD_14[1] == "This is a photo of a {}"  # no period in the source


def test_unknown_name_lists_known_sets() -> None:
    with pytest.raises(KeyError, match="maskclip85"):
        prompts.get_templates("maskclip80")

"""Classical proposals: SAM-shaped outputs, masks that follow the regions under the points."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.toyworld import render_scene, split_seed
from pipeline.models.proposals import ClassicalProposals, ProposalConfig
from pipeline.sample_files import rle_to_mask


def _two_halves() -> np.ndarray:
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, 24:] = [250, 250, 250]
    return image


@pytest.mark.parametrize("method", ["felzenszwalb", "slic"])
def test_regions_partition_the_image(method: str) -> None:
    regions = ClassicalProposals(ProposalConfig(method=method, n_segments=8)).regions(_two_halves())
    assert regions.shape == (32, 48) and regions.dtype == np.int32
    assert set(np.unique(regions)) == set(range(regions.max() + 1))
    assert not np.intersect1d(regions[:, :24], regions[:, 24:]).size  # no region crosses the colour edge


def test_point_prompt_returns_the_region_under_the_point() -> None:
    proposals = ClassicalProposals(ProposalConfig(sigma=0.0))  # no smoothing: exactly the two halves
    [(masks, scores)] = proposals.predict_points(_two_halves(), [np.array([[30.5, 10.5]])])
    assert masks.shape == (1, 32, 48) and masks.dtype == bool and scores.tolist() == [1.0]
    expected = np.zeros((32, 48), bool)
    expected[:, 24:] = True
    assert (masks[0] == expected).all()
    both = proposals.predict_points(_two_halves(), [np.array([[2.0, 2.0], [40.0, 30.0]])])[0][0][0]
    assert both.all()
    background_only = proposals.predict_points(_two_halves(), [np.array([[2.0, 2.0]])], labels=[np.array([0])])
    assert not background_only[0][0].any()


def test_generate_gives_sam_records_covering_every_pixel() -> None:
    image = render_scene(split_seed("val", 0), 64).image
    records = ClassicalProposals().generate(image)
    masks = np.stack([rle_to_mask(r["segmentation"]) for r in records])
    assert (masks.sum(0) == 1).all()
    for record, mask in zip(records, masks):
        assert record["area"] == mask.sum()
        x, y, w, h = record["bbox"]
        assert mask[y:y + h, x:x + w].sum() == mask.sum() and mask[y, x:x + w].any() and mask[y:y + h, x].any()
        px, py = record["point_coords"][0]
        assert mask[int(py), int(px)]


def test_identity_names_method_and_knobs() -> None:
    assert ClassicalProposals().identity == "proposals:felzenszwalb(scale=100.0,sigma=0.5,min_size=20)"
    assert "n_segments=10" in ClassicalProposals(ProposalConfig(method="slic", n_segments=10)).identity
    with pytest.raises(ValueError, match="felzenszwalb"):
        ClassicalProposals(ProposalConfig(method="watershed"))

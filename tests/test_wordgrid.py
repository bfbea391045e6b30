"""The word-grid sampling law (IFSeg §2.3 / App. A.1) and the grid -> token/label map upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torchvision.transforms import InterpolationMode, Resize

from pipeline.config import ConfigError
from pipeline.data.vocab import load_vocab
from pipeline.stage import StageContext
from stages.wordgrid import WordGridStage, grid_to_maps, sample_grid, sample_stream, upsample_grid

P_MIN = 1e-3  # a correct sampler fails a chi-square test at this level one time in a thousand


def draw(n: int, **kwargs) -> list[np.ndarray]:
    return [sample_grid(sample_stream(0, "law", i), **kwargs) for i in range(n)]


def test_grid_sides_are_independent_and_uniform_on_1_to_S():
    grids = draw(4000, num_classes=5, max_size=8)
    heights = np.array([g.shape[0] for g in grids])
    widths = np.array([g.shape[1] for g in grids])
    for sides in (heights, widths):
        counts = np.bincount(sides, minlength=9)[1:]
        assert sides.min() == 1 and sides.max() == 8
        assert chisquare(counts).pvalue > P_MIN
    joint = np.bincount((heights - 1) * 8 + (widths - 1), minlength=64)
    assert chisquare(joint).pvalue > P_MIN  # independence: the 64 (U, V) pairs are equally likely


def test_class_ids_are_iid_uniform_with_replacement():
    grids = draw(300, num_classes=12, max_size=16)
    ids = np.concatenate([g.ravel() for g in grids])
    assert ids.min() == 0 and ids.max() == 11
    assert chisquare(np.bincount(ids, minlength=12)).pvalue > P_MIN
    pairs = np.concatenate([g.ravel()[:-1] * 12 + g.ravel()[1:] for g in grids if g.size > 1])
    assert chisquare(np.bincount(pairs, minlength=144)).pvalue > P_MIN  # neighbours independent


def test_hierarchical_draws_coarse_uniformly_then_fine_within_group():
    groups = [(0,), (1, 2, 3), (4, 5)]
    grids = draw(400, num_classes=6, max_size=12, groups=groups)
    ids = np.concatenate([g.ravel() for g in grids])
    group_of = np.array([0, 1, 1, 1, 2, 2])
    assert chisquare(np.bincount(group_of[ids], minlength=3)).pvalue > P_MIN
    assert chisquare(np.bincount(ids[group_of[ids] == 1], minlength=4)[1:]).pvalue > P_MIN
    # fine class 0 is alone in its group: it is drawn ~3x as often as class 1 (1/3 vs 1/9)
    counts = np.bincount(ids, minlength=6)
    assert 2.5 < counts[0] / counts[1] < 3.6


def test_samples_depend_only_on_seed_node_and_index():
    a = sample_grid(sample_stream(7, "wordgrid", 123), num_classes=9, max_size=32)
    b = sample_grid(sample_stream(7, "wordgrid", 123), num_classes=9, max_size=32)
    c = sample_grid(sample_stream(7, "wordgrid", 124), num_classes=9, max_size=32)
    d = sample_grid(sample_stream(8, "wordgrid", 123), num_classes=9, max_size=32)
    assert np.array_equal(a, b)
    assert not (a.shape == c.shape and np.array_equal(a, c))
    assert not (a.shape == d.shape and np.array_equal(a, d))


@pytest.mark.parametrize("out_size", [32, 512, 480, 37, 5, 64])
def test_upsample_matches_torchvision_resize_nearest(out_size):
    rng = np.random.default_rng(out_size)
    for _ in range(40):
        grid = rng.integers(0, 171, size=tuple(rng.integers(1, 33, size=2)))
        expected = Resize((out_size, out_size), InterpolationMode.NEAREST)(torch.from_numpy(grid)[None, None])
        assert np.array_equal(upsample_grid(grid, out_size, out_size), expected[0, 0].numpy())


def test_grid_to_maps_gives_token_and_label_maps():
    grid = np.array([[0, 1], [2, 3]])
    tokens, labels = grid_to_maps(grid, token_size=4, label_size=8)
    assert tokens.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert labels.shape == (8, 8) and labels[7, 7] == 3 and labels[0, 4] == 1


def stage(**config) -> WordGridStage:
    return WordGridStage(StageContext(node="wordgrid", seed=0, config={"vocab": "toy", **config}))


def test_stage_never_samples_outside_the_vocabulary_and_stores_small_grids():
    wg = stage(num_samples=50, samples_per_shard=20, max_grid_size=6)
    plans = wg.plan()
    assert [len(p.items) for p in plans] == [20, 20, 10]
    outputs = wg.process_batch(plans[0].items)
    grid = np.load(__import__("io").BytesIO(outputs[0].files["grid.npy"]))
    assert grid.dtype == np.uint8 and max(grid.shape) <= 6 and grid.max() < load_vocab("toy").num_classes


def test_hierarchical_without_coarse_groups_is_a_config_error():
    with pytest.raises(ConfigError, match="coarse"):
        WordGridStage(StageContext(node="wordgrid", seed=0, config={"vocab": "camvid_11", "hierarchical": True}))


def test_unknown_config_key_names_the_key():
    with pytest.raises(ConfigError, match="max_grid"):
        stage(max_grid=3)

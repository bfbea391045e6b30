"""Tests for pipeline.predict.engine and .protocol: mmseg resize/slide semantics, score order, penalty, presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.predict.engine import predict, predict_scores, rescale_size, slide_logits, slide_windows
from pipeline.predict.protocol import Protocol, build_protocol, load_protocol


def _image(height: int = 360, width: int = 480, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pointwise(num_classes: int = 5, seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, num_classes, kernel_size=1)


def test_rescale_size_follows_mmcv_keep_ratio_rounding() -> None:
    assert rescale_size(360, 480, 512, 2048) == (512, 683)  # 480 * 512 / 360 = 682.67
    assert rescale_size(100, 1000, 512, 2048) == (205, 2048)  # long side caps the scale at 2.048
    assert rescale_size(480, 640, 640, 2560) == (640, 853)


def test_slide_grid_matches_mmseg_on_known_sizes() -> None:
    assert slide_windows(512, 683, 512, 426) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    boxes = slide_windows(1024, 2048, 512, 341)  # Cityscapes-style: 3 x 6 windows
    assert len(boxes) == 18
    assert boxes[5] == (0, 512, 1536, 2048) and boxes[-1] == (512, 1024, 1536, 2048)
    assert slide_windows(300, 200, 448, 224) == [(0, 300, 0, 200)]  # smaller than the crop: one window


def test_count_map_covers_every_pixel_with_overlap_counted_twice() -> None:
    conv = _pointwise()
    pixels = torch.rand(1, 3, 512, 683)
    _, count = slide_logits(pixels, conv, 5, Protocol(mode="slide", crop=512, stride=426))
    count = count[0, 0]
    assert int(count.min()) >= 1
    assert torch.all(count[:, 171:512] == 2) and torch.all(count[:, :171] == 1) and torch.all(count[:, 512:] == 1)


def test_slide_equals_whole_for_translation_equivariant_model() -> None:
    conv = _pointwise(num_classes=6)
    image = _image()
    whole_protocol = Protocol(short_side=256, mode="whole")
    slide_protocol = Protocol(short_side=256, mode="slide", crop=128, stride=85)
    whole = predict_scores(image, conv, whole_protocol, 6)
    slide = predict_scores(image, conv, slide_protocol, 6)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predict(image, conv, slide_protocol, 6), predict(image, conv, whole_protocol, 6))


def test_slide_differs_from_whole_for_position_dependent_model() -> None:
    def ramp(pixels: torch.Tensor) -> torch.Tensor:  # class 1 grows with the column inside the input
        width = pixels.shape[-1]
        col = torch.linspace(-1.0, 1.0, width).expand(1, 1, pixels.shape[-2], width)
        return torch.cat([torch.zeros_like(col), col], dim=1)

    image = _image()
    whole = predict(image, ramp, Protocol(mode="whole", score="raw"), 2)
    slide = predict(image, ramp, Protocol(mode="slide", crop=256, stride=170, score="raw"), 2)
    assert whole.shape == slide.shape == (360, 480)
    assert (whole != slide).any()


def test_output_has_original_shape_and_model_sees_resized_unnormalised_pixels() -> None:
    seen_shapes: list[tuple[int, ...]] = []

    def low_res(pixels: torch.Tensor) -> torch.Tensor:  # stride-16 logits, like a ViT/ResNet head
        seen_shapes.append(tuple(pixels.shape))
        assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
        return F.avg_pool2d(pixels, 16, ceil_mode=True)

    pred = predict(_image(37, 53), low_res, Protocol(short_side=512), 3)
    assert pred.shape == (37, 53) and pred.dtype == np.int64
    assert seen_shapes == [(1, 3, 512, 733)]
    white = np.full((20, 30, 3), 255, dtype=np.uint8)
    captured: list[torch.Tensor] = []
    predict(white, lambda x: captured.append(x) or x, Protocol(short_side=40), 3)
    assert torch.all(captured[0] == 1.0)


def test_small_image_windows_are_padded_to_crop() -> None:
    seen_shapes: list[tuple[int, ...]] = []

    def record(pixels: torch.Tensor) -> torch.Tensor:
        seen_shapes.append(tuple(pixels.shape[-2:]))
        return pixels[:, :2]

    protocol = Protocol(short_side=100, mode="slide", crop=128, stride=64)
    pred = predict(_image(300, 400), record, protocol, 2)
    assert seen_shapes == [(128, 128), (128, 128)]  # resized to 100 x 133: one row, two windows
    assert pred.shape == (300, 400)


def test_sigmoid_is_applied_per_window_before_averaging() -> None:
    calls = iter([4.0, 0.0])  # first window: class-0 logit 4; second window: 0

    def per_window(pixels: torch.Tensor) -> torch.Tensor:
        value = next(calls)
        return torch.stack([torch.full(pixels.shape[-2:], value), torch.zeros(pixels.shape[-2:])])[None]

    protocol = Protocol(mode="slide", crop=512, stride=426, score="sigmoid")
    scores = predict_scores(_image(), per_window, protocol, 2)  # resized 512 x 683; overlap cols 171..511
    sig = torch.sigmoid(torch.tensor(4.0))
    assert float(scores[0, 180, 10]) == pytest.approx(float(sig), abs=1e-6)
    assert float(scores[0, 180, 240]) == pytest.approx(float((sig + 0.5) / 2), abs=1e-6)
    assert float(scores[1, 180, 240]) == pytest.approx(0.5, abs=1e-6)


def test_seen_penalty_flips_a_near_tie() -> None:
    def near_tie(pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[-2:]
        return torch.stack([torch.full((h, w), 0.30), torch.full((h, w), 0.25)])[None]

    image = _image(24, 32)
    plain = Protocol(short_side=24, score="sigmoid")
    penalised = Protocol(short_side=24, score="sigmoid", seen_penalty=0.1)
    assert np.all(predict(image, near_tie, plain, 2, seen_ids=[0]) == 0)
    assert np.all(predict(image, near_tie, penalised, 2, seen_ids=[0]) == 1)
    assert np.all(predict(image, near_tie, penalised, 2, seen_ids=[]) == 0)


def test_wrong_logits_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[1, 4, h, w\]"):
        predict(_image(16, 16), lambda x: x, Protocol(short_side=16), 4)
    with pytest.raises(ValueError, match="uint8"):
        predict(np.zeros((8, 8, 3), np.float32), lambda x: x, Protocol(), 3)


def test_presets_load_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ifseg, zeg, zsseg, tcl = (load_protocol(n) for n in ("ifseg", "zegclip", "zsseg", "tcl"))
    assert (ifseg.short_side, ifseg.max_long_side, ifseg.mode, ifseg.knn_postprocess) == (512, 2048, "whole", True)
    assert (zeg.mode, zeg.crop, zeg.stride, zeg.seen_penalty, zeg.score) == ("slide", 512, 426, 0.1, "sigmoid")
    assert (zsseg.short_side, zsseg.max_long_side, zsseg.mode) == (640, 2560, "whole")
    assert (tcl.short_side, tcl.mode, tcl.crop, tcl.stride) == (448, "slide", 448, 224)
    assert [p.name for p in (ifseg, zeg, zsseg, tcl)] == ["ifseg", "zegclip", "zsseg", "tcl"]
    with pytest.raises(ConfigError, match=r"selftrain\.protocol='nope': no preset .*known presets: \['ifseg', "):
        load_protocol("nope", key="selftrain.protocol")


def test_overrides_apply_in_order_and_unknown_keys_are_named() -> None:
    protocol = load_protocol("zegclip", [{"short_side": 64, "mode": "whole"}, {"short_side": 32}])
    assert (protocol.short_side, protocol.mode, protocol.crop) == (32, "whole", 512)
    with pytest.raises(ConfigError, match=r"eval\.protocol overrides: unknown protocol key\(s\) \['crop_size'\]"):
        load_protocol("ifseg", [{"crop_size": 3}], key="eval.protocol")


def test_invalid_protocol_values_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"p\.mode='tiles': expected one of \['whole', 'slide'\]"):
        build_protocol({"mode": "tiles"}, "p")
    with pytest.raises(ConfigError, match=r"p: protocol\.stride must satisfy"):
        build_protocol({"crop": 256, "stride": 300}, "p")
    with pytest.raises(ValueError, match="stride"):
        Protocol(crop=256, stride=300)


def test_one_hot_gt_model_recovers_camvid_labels_through_the_resize_chain(shared_data: Path) -> None:
    from PIL import Image

    from pipeline.metrics import ConfusionMatrix, compute_metrics

    name = "0016E5_07959.png"
    image = np.array(Image.open(shared_data / "camvid" / "val" / name).convert("RGB"))
    gt = np.array(Image.open(shared_data / "camvid" / "valannot" / name)).astype(np.int64)
    gt[gt == 11] = 255

    def oracle(pixels: torch.Tensor) -> torch.Tensor:  # one-hot GT at the model's input size (nearest)
        label = torch.from_numpy(np.where(gt == 255, 0, gt))[None, None].float()
        label = F.interpolate(label, size=pixels.shape[-2:], mode="nearest")[0, 0].long()
        return F.one_hot(label, 11).permute(2, 0, 1)[None].float() * 10.0

    cm = ConfusionMatrix(11)
    for protocol in (load_protocol("ifseg"), load_protocol("zsseg")):  # whole-image: the oracle sees it all
        pred = predict(image, oracle, protocol, 11)
        assert pred.shape == gt.shape
        cm.update(pred, gt)
    assert compute_metrics(cm, [str(i) for i in range(11)])["pAcc"] > 98.0

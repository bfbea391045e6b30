"""Tests for pipeline/data/images.py: robust decoding of bad, odd and huge images."""

from __future__ import annotations

import io
import struct
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageDecodeError, decode_image, read_bytes, read_label_png


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming width x height RGB pixels, with no pixel data (a cheap bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def rgb_gradient(height: int = 24, width: int = 32) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 8 % 256, cols * 8 % 256, (rows + cols) % 256], axis=2).astype(np.uint8)


def test_rgb_png_round_trips_exactly() -> None:
    pixels = rgb_gradient()
    image, notes = decode_image(encode(Image.fromarray(pixels)))
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    np.testing.assert_array_equal(image, pixels)
    assert notes == []


def test_zero_byte_file_is_an_error() -> None:
    with pytest.raises(ImageDecodeError, match="zero-byte file"):
        decode_image(b"")


def test_truncated_jpeg_is_an_error() -> None:
    data = encode(Image.fromarray(rgb_gradient(64, 64)), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason == "truncated image"


def test_random_bytes_are_an_error() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="unrecognised or corrupt"):
        decode_image(noise)


def test_corrupt_pixel_data_is_an_error() -> None:
    data = bytearray(encode(Image.fromarray(rgb_gradient(64, 64))))
    start = data.index(b"IDAT") + 8
    data[start:start + 64] = bytes(64)
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_cmyk_jpeg_is_converted_with_a_note() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow = red
    image, notes = decode_image(encode(cmyk, "JPEG", quality=100))
    assert image.shape == (16, 16, 3)
    assert notes == ["converted from CMYK"]
    red, green, blue = image.reshape(-1, 3).mean(axis=0)
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("value", [0x1234, 0xFFFF, 0x00FF])
def test_sixteen_bit_png_is_scaled_by_shift_8(value: int) -> None:
    grey = np.full((5, 7), value, dtype=np.uint16)
    image, notes = decode_image(encode(Image.fromarray(grey)))
    assert image.shape == (5, 7, 3)
    assert np.all(image == value >> 8)
    assert len(notes) == 1 and "16-bit" in notes[0] and ">> 8" in notes[0]


def test_grayscale_is_replicated_to_three_channels() -> None:
    grey = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    image, notes = decode_image(encode(Image.fromarray(grey, mode="L")))
    np.testing.assert_array_equal(image, np.repeat(grey[:, :, None], 3, axis=2))
    assert notes == ["converted from L"]


def test_palette_image_uses_palette_colours() -> None:
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image, notes = decode_image(encode(palette_image))
    assert image[0, 0].tolist() == [10, 20, 30] and image[0, 1].tolist() == [200, 100, 0]
    assert image[1, 0].tolist() == [0, 0, 255]
    assert notes == ["converted from P"]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black
    rgba[0, 1] = (0, 0, 0, 0)  # transparent black -> white
    source = Image.fromarray(rgba, mode="RGBA").convert(mode)
    image, notes = decode_image(encode(source))
    assert image[0, 0].tolist() == [0, 0, 0]
    assert image[0, 1].tolist() == [255, 255, 255]
    assert notes == [f"converted from {mode} (alpha composited on white)"]


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left of a 3-wide, 2-high image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image, notes = decode_image(encode(Image.fromarray(pixels), exif=exif.tobytes()))
    assert image.shape == (3, 2, 3)
    assert image[0, 1].tolist() == [255, 0, 0]  # top-left moved to top-right
    assert notes == ["EXIF orientation 6 applied"]


def test_size_limit_is_checked_from_the_header() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_header_only(8000, 8000))
    assert info.value.reason == "image too large: 8000x8000 > max_pixels=50000000"


def test_pil_decompression_bomb_guard_becomes_an_error() -> None:
    with pytest.raises(ImageDecodeError, match="^image too large"):
        decode_image(png_header_only(20000, 20000), max_pixels=10**10)


def test_max_pixels_knob_applies_to_real_images() -> None:
    data = encode(Image.fromarray(rgb_gradient(20, 20)))
    assert decode_image(data, max_pixels=400)[0].shape == (20, 20, 3)
    with pytest.raises(ImageDecodeError, match="20x20 > max_pixels=399"):
        decode_image(data, max_pixels=399)


def test_label_png_keeps_palette_indices_not_colours() -> None:
    indices = np.array([[0, 15], [255, 3]], dtype=np.uint8)
    label_image = Image.fromarray(indices, mode="P")
    label_image.putpalette(list(range(256)) * 3)
    label = read_label_png(encode(label_image))
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, indices)


def test_label_png_sixteen_bit_values_are_kept() -> None:
    values = np.array([[0, 170], [65535, 300]], dtype=np.uint16)
    label = read_label_png(encode(Image.fromarray(values)))
    np.testing.assert_array_equal(label, values)


def test_label_png_rgb_is_returned_as_colours() -> None:
    colours = rgb_gradient(3, 4)
    np.testing.assert_array_equal(read_label_png(encode(Image.fromarray(colours))), colours)


def test_label_png_bad_data_is_an_error() -> None:
    with pytest.raises(ImageDecodeError, match="zero-byte file"):
        read_label_png(b"")


def test_read_bytes_works_on_fsspec_urls() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/test_images/x.bin", b"payload")
    assert read_bytes("memory://test_images/x.bin") == b"payload"
    with pytest.raises(FileNotFoundError):
        read_bytes("memory://test_images/missing.bin")

"""Robust image and label-map decoding from bytes (local paths or any fsspec URL).

Everything a worker needs to turn untrusted bytes into a clean ``HxWx3 uint8 RGB`` array, or into a
clear, one-line failure reason. Bad data raises :class:`ImageDecodeError` (callers turn it into a
failed record); only programming errors raise anything else.
"""

from __future__ import annotations

import io
import warnings

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(Exception):
    """Raised when bytes cannot become an image; ``reason`` is a short, human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_bytes(source: str) -> bytes:
    """Read a whole file through fsspec.

    Args:
        source: Local path or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``...).

    Returns:
        The raw bytes.

    Raises:
        FileNotFoundError: When the file does not exist (callers treat it as bad input).
        OSError: On other I/O failures.
    """
    with fsspec.open(source, "rb") as handle:
        return handle.read()


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse empty, unknown or oversized images before decoding pixels."""
    if len(data) == 0:
        raise ImageDecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("unrecognised or corrupt image data") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"image too large: {width}x{height} > max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise ImageDecodeError(f"empty image: {width}x{height}")
    return image


def _load_pixels(image: Image.Image) -> None:
    """Force the full decode; truncated or corrupt pixel data becomes :class:`ImageDecodeError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except OSError as exc:
        text = str(exc)
        reason = "truncated image" if "truncated" in text.lower() else f"corrupt image data: {text}"
        raise ImageDecodeError(reason) from None
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt image data: {exc}") from None


def _apply_exif(image: Image.Image, notes: list[str]) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag (``ImageOps.exif_transpose``); unreadable EXIF is noted and ignored."""
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (None, 1):
            return image
        transposed = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF comes in many exception types; never fatal
        notes.append(f"EXIF unreadable, orientation ignored ({type(exc).__name__})")
        return image
    notes.append(f"EXIF orientation {orientation} applied")
    return transposed


def _to_rgb(image: Image.Image, notes: list[str]) -> np.ndarray:
    """Convert any PIL mode to ``HxWx3 uint8`` RGB, noting every non-trivial conversion.

    Choices (the papers are silent): alpha is composited onto white; 16/32-bit integer grey is scaled
    by ``>> 8`` (values clipped to 0..65535 first); float grey is clipped to 0..255; palette images
    with transparency go through RGBA (so transparency composites onto white too).
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        notes.append(f"converted from {mode} (16-bit grey, scaled >> 8)")
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)
        notes.append("converted from F (float grey, clipped to 0..255)")
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "P+transparency"
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"converted from {mode} (alpha composited on white)")
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    notes.append(f"converted from {mode}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Decode image bytes to RGB with EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb
    costs nothing. PIL's own bomb guard (``Image.MAX_IMAGE_PIXELS``; error above twice that) is also
    caught and reported as "image too large". Multi-frame files (GIF, TIFF) yield their first frame.

    Args:
        data: Encoded image bytes (any PIL-readable format).
        max_pixels: Largest accepted ``width * height`` (pixels).

    Returns:
        ``(image, notes)``: ``image`` is ``HxWx3 uint8`` RGB (H rows, W columns, after EXIF
        orientation); ``notes`` lists conversions made, e.g. ``"converted from CMYK"``.

    Raises:
        ImageDecodeError: Zero-byte, unrecognised, truncated, corrupt or too large input.
    """
    image = _open_checked(data, max_pixels)
    notes: list[str] = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"first of {frames} frames")
    _load_pixels(image)
    image = _apply_exif(image, notes)
    try:
        rgb = _to_rgb(image, notes)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot convert {image.mode} to RGB: {exc}") from None
    return np.ascontiguousarray(rgb), notes


def read_label_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a label map keeping the raw stored values (no colour conversion, no EXIF rotation).

    Args:
        data: Encoded label bytes (normally PNG).
        max_pixels: Largest accepted ``width * height`` (pixels).

    Returns:
        ``HxW`` array of raw values: palette *indices* for ``P`` mode, grey values for ``L``/``1``
        (``uint8``), ``uint16`` for 16-bit grey, ``int32`` for ``I``; ``HxWx3 uint8`` for RGB(A)
        colour-coded labels (alpha dropped).

    Raises:
        ImageDecodeError: Zero-byte, unrecognised, truncated, corrupt or too large input.
    """
    image = _open_checked(data, max_pixels)
    _load_pixels(image)
    mode = image.mode
    if mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if mode == "1":
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        return np.asarray(image, dtype=np.int32)
    if mode in ("RGB", "RGBA"):
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[:, :, :3])
    raise ImageDecodeError(f"unsupported label mode {mode}")

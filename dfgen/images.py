"""The one image guard: every stage that takes image bytes (prompt loading, benchmark adapters,
sampling, training, eval) checks them here, with the same limits and reasons.

``check_image(data)`` -> (width, height) or ``BadImage`` (a one-line ``UserError``): empty data,
over ``MAX_IMAGE_BYTES``, over ``MAX_IMAGE_PIXELS`` (PIL's own decompression-bomb guard included),
zero-sized, or undecodable. ``decode_image(data)`` also decodes to RGB (16-bit greyscale scaled to
8 bits). Benchmark adapters turn ``BadImage`` into a counted per-record skip.
"""
from __future__ import annotations

import io
import warnings

from dfgen.errors import UserError

MAX_IMAGE_PIXELS = 50_000_000  # a 7k x 7k photo; far above any VLM's input size
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class BadImage(UserError):
    """Image bytes refused by the guard; the message is the reason, one line."""


def _open(data: bytes, max_pixels: int, verify: bool):
    """(PIL image, still open) after the size checks; the caller closes it."""
    from PIL import Image

    if not data:
        raise BadImage("empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"image file too large ({len(data)} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise BadImage(f"image too large ({w}x{h} pixels; limit {max_pixels})")
        if w == 0 or h == 0:
            raise BadImage("undecodable image (zero-sized)")
        if verify:
            im.verify()
        return im
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own guard, at open
        raise BadImage(f"image too large (a decompression bomb; limit {max_pixels} pixels)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BadImage(f"undecodable image ({type(e).__name__})") from None


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of image bytes that pass the guard (decodable, sane size); else BadImage."""
    im = _open(data, max_pixels, verify=True)
    size = im.size
    im.close()
    return size


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """Bytes -> RGB PIL image, refusing what ``check_image`` refuses (BadImage)."""
    im = _open(data, max_pixels, verify=False)
    try:
        return _to_rgb(im)
    except Exception as e:  # noqa: BLE001 - truncated data fails only when the pixels are read
        raise BadImage(f"undecodable image ({type(e).__name__})") from None
    finally:
        im.close()


def _to_rgb(im):
    """Any PIL mode -> RGB. 16-bit greyscale (``I;16*``, or ``I`` holding 16-bit values) is
    scaled to 8 bits; PIL's own conversion would clip everything above 255 to white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np
        from PIL import Image

        a = np.asarray(im).astype(np.int64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a * 255 // 65535
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))  # mode L
    return im.convert("RGB")

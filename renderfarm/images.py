"""Decoding user-supplied images safely (img2img init images)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

MAX_INIT_IMAGE_BYTES = 8 * 1024 * 1024
MAX_INIT_IMAGE_PIXELS = 2048 * 2048


def b64decode_image(value: str) -> bytes:
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    if len(value) > MAX_INIT_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"is over the {MAX_INIT_IMAGE_BYTES // 2**20} MiB limit")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def open_image(data: bytes) -> Image.Image:
    """Open and fully decode an image, refusing decompression bombs and oversize images."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_INIT_IMAGE_PIXELS:
                raise ValueError(
                    f"is {img.width}x{img.height}, over the limit of {MAX_INIT_IMAGE_PIXELS} pixels"
                )
            img.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ValueError(f"is a decompression bomb ({exc})") from None
        except ValueError:
            raise
        except Exception as exc:  # Pillow raises many kinds for garbage input
            raise ValueError(f"is not an image Pillow can read ({type(exc).__name__})") from None
    return img.convert("RGB")


def decode_init_image(value: str) -> Image.Image:
    return open_image(b64decode_image(value))


def encode_init_image(data: bytes) -> str:
    """The base64 form a job's ``init_image`` takes."""
    return base64.b64encode(data).decode("ascii")

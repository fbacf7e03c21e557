"""Decoding user-supplied images safely (img2img init images).

Only PNG, JPEG and WebP are opened (Pillow's ``formats=``): other formats Pillow knows (BMP,
TIFF, ICO, TGA, PCX, EPS through Ghostscript...) never reach their decoders. Checking an init
image at submit decodes it fully; :func:`check_init_image` remembers the verdict by the
image's SHA-256, so a batch whose jobs share one image decodes it once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
import warnings
from collections import OrderedDict

from PIL import Image, UnidentifiedImageError

MAX_INIT_IMAGE_BYTES = 8 * 1024 * 1024
MAX_INIT_IMAGE_PIXELS = 2048 * 2048
INIT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
CHECKED_CACHE_SIZE = 256  # verdicts (a digest and an error or None) kept per process


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
            img = Image.open(io.BytesIO(data), formats=INIT_IMAGE_FORMATS)
            if img.width * img.height > MAX_INIT_IMAGE_PIXELS:
                raise ValueError(
                    f"is {img.width}x{img.height}, over the limit of {MAX_INIT_IMAGE_PIXELS} pixels"
                )
            img.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ValueError(f"is a decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise ValueError("is not an image in an accepted format: PNG, JPEG or WebP") from None
        except ValueError:
            raise
        except Exception as exc:  # Pillow raises many kinds for garbage input
            raise ValueError(f"is not an image Pillow can read ({type(exc).__name__})") from None
    return img.convert("RGB")


def decode_init_image(value: str) -> Image.Image:
    return open_image(b64decode_image(value))


_checked: OrderedDict[bytes, str | None] = OrderedDict()
_checked_lock = threading.Lock()


def check_init_image(value: str) -> None:
    """Raise ValueError with the reason unless ``value`` is an acceptable init image.

    Same answer as :func:`decode_init_image`, but an image checked before (by content hash) is
    not decoded again."""
    digest = hashlib.sha256(value.encode()).digest()
    with _checked_lock:
        known = digest in _checked
        verdict = _checked.get(digest)
        if known:
            _checked.move_to_end(digest)
    if not known:
        try:
            decode_init_image(value)
            verdict = None
        except ValueError as exc:
            verdict = str(exc)
        with _checked_lock:
            _checked[digest] = verdict
            while len(_checked) > CHECKED_CACHE_SIZE:
                _checked.popitem(last=False)
    if verdict is not None:
        raise ValueError(verdict)


def encode_init_image(data: bytes) -> str:
    """The base64 form a job's ``init_image`` takes."""
    return base64.b64encode(data).decode("ascii")

"""Where rendered images go: one small ``Storage`` interface, a local and an S3 backend.

``open_storage(settings)`` picks the backend from ``settings.resolved_storage_url``:
``file:///abs/dir`` is a :class:`~storage.local.LocalStorage`, ``s3://bucket/prefix`` an
:class:`~storage.s3.S3Storage`. Keys are relative, slash-separated paths such as
``"batch/job-0.png"``; every backend checks them with :func:`check_key`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from renderfarm.settings import Settings

__all__ = ["Storage", "check_key", "check_prefix", "open_storage"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@runtime_checkable
class Storage(Protocol):
    """A flat key -> bytes store where the first writer of a key wins."""

    describe: str  #: human text naming where objects go; never holds credentials

    def put(self, key: str, data: bytes, content_type: str,
            metadata: Mapping[str, str] | None = None) -> bool:
        """Store ``data`` at ``key``; True if this call created it, False if it already existed.
        ``metadata`` (ASCII names and values) goes with the object where the backend keeps
        metadata (S3's ``x-amz-meta-*``); local files have none, their JSON sidecar says it."""
        ...

    def object_key(self, key: str) -> str:
        """The backend's whole name of ``key``: the S3 object key (prefix included), the path
        under the root for local storage."""
        ...

    def get(self, key: str) -> bytes:
        """The object at ``key``; ``KeyError(key)`` if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        ...

    def url(self, key: str) -> str:
        """Where a reader can fetch ``key``: a presigned URL (S3) or an absolute path (local)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is absent."""
        ...

    def transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by this backend) can pass if tried again later: the store
        is unreachable, timed out, failed on its side or throttles (storage/retry.py)."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""
        ...


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``ValueError`` naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key must not contain backslashes or NUL, got {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative, got {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"storage key must be a relative path like 'batch/job-0.png' without '', '.' or "
            f"'..' components, got {key!r}"
        )
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is empty or a safe key prefix (a trailing '/' is allowed)."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


def open_storage(settings: Settings) -> Storage:
    """The backend named by ``settings.resolved_storage_url``."""
    value = settings.resolved_storage_url
    parts = urlsplit(value)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        from pathlib import Path

        from storage.local import LocalStorage

        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3" and _BUCKET.match(parts.netloc) and not parts.query:
        from storage.s3 import S3Storage

        return S3Storage(
            bucket=parts.netloc,
            prefix=unquote(parts.path),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            presign_expires=settings.presign_expires,
        )
    raise ValueError(
        "RENDERFARM_STORAGE_URL must be file:///absolute/dir or s3://bucket/prefix, "
        f"got {_redacted(value)!r}"
    )


def _redacted(url: str) -> str:
    """``url`` with any ``user:password@`` part hidden."""
    return re.sub(r"//[^/@]*@", "//***@", url)

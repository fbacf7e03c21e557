"""Storing through an outage: a put that fails in a way that can pass (the endpoint is
unreachable, times out, answers 5xx or throttles) is tried again, with growing waits, for as
long as the caller's patience (``RENDERFARM_STORE_RETRY_SECONDS``, minutes by default) lasts.

Each backend says which of its errors can pass (``Storage.transient``); anything else (access
denied, a bad key) fails at once. boto3's own retries (storage/s3.py) cover blips of a second;
this covers an S3 or MinIO restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage import Storage

FIRST_WAIT = 1.0  # seconds before the second try
LONGEST_WAIT = 15.0  # the waits double up to this


def put_with_retries(
    storage: Storage,
    key: str,
    data: bytes,
    content_type: str,
    metadata: Mapping[str, str] | None = None,
    *,
    patience: float,
    before_try: Callable[[int, BaseException | None], None] = lambda tries, last: None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """``storage.put`` until it succeeds, fails for good, or ``patience`` seconds have passed
    (then the last error is raised). ``before_try(tries so far, last error)`` runs before each
    try: the worker records the retry there and raises to stop (a cancel, a lost lease)."""
    deadline = time.monotonic() + patience
    wait = FIRST_WAIT
    tries, last = 0, None
    while True:
        before_try(tries, last)
        try:
            return storage.put(key, data, content_type, metadata)
        except Exception as exc:
            if not storage.transient(exc) or time.monotonic() + wait > deadline:
                raise
            last = exc
        tries += 1
        sleep(wait)
        wait = min(wait * 2, LONGEST_WAIT)

"""Images in an S3 bucket (AWS, MinIO, R2, Ceph): conditional writes, presigned URLs, retries."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from storage import check_key, check_prefix

# Standard mode retries connection errors, 5xx and throttling with jittered exponential backoff,
# a few times: blips of a second. Longer outages are waited out by the worker
# (storage/retry.py), which says in the job's record that it is retrying.
RETRY_CONFIG = {"mode": "standard", "max_attempts": 3}
#: Error codes of a store that is busy or failing on its side: worth trying again later.
TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown",
    "RequestLimitExceeded", "TooManyRequestsException", "RequestThrottled",
    "RequestThrottledException", "RequestTimeout", "RequestTimeoutException",
    "ServiceUnavailable", "InternalError", "PriorRequestNotComplete",
})
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
_CONFLICT_RETRIES = 5


class S3Storage:
    """Objects at ``s3://bucket/<prefix><key>``; credentials come from boto3's usual chain."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_expires: int = 3600,
    ):
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = check_prefix(prefix + "/") if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.presign_expires = presign_expires
        config = Config(
            retries=RETRY_CONFIG,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            signature_version="s3v4",
            # Custom endpoints (MinIO, moto, IPs) rarely serve virtual-hosted bucket names.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        where = f" at {_without_userinfo(endpoint_url)}" if endpoint_url else ""
        self.describe = f"s3://{bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def object_key(self, key: str) -> str:
        return self._key(key)

    def put(self, key: str, data: bytes, content_type: str,
            metadata: Mapping[str, str] | None = None) -> bool:
        """``put_object`` with ``IfNoneMatch="*"``: False when the key already holds an object.
        ``metadata`` becomes the object's user metadata (``x-amz-meta-<name>``).

        A 409 ConditionalRequestConflict (a concurrent write to the same key) is settled by
        looking again: False if an object is now there, else the put is tried once more.
        """
        name = self._key(key)
        for _ in range(_CONFLICT_RETRIES):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=name, Body=data, ContentType=content_type,
                    IfNoneMatch="*", Metadata=dict(metadata or {}),
                )
                return True
            except ClientError as exc:
                code = _error_code(exc)
                if code == "PreconditionFailed" or _status(exc) == 412:
                    return False
                if code != "ConditionalRequestConflict":
                    raise
            if self.exists(key):
                return False
        raise RuntimeError(f"put of {name!r} kept conflicting with concurrent writes")

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                raise KeyError(key) from None
            raise
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def transient(self, exc: BaseException) -> bool:
        """Unreachable, timed out, 5xx, throttled: an outage that can pass."""
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(exc, ClientError):
            status = _status(exc) or 0
            return status >= 500 or status == 429 or _error_code(exc) in TRANSIENT_CODES
        return False

    def url(self, key: str) -> str:
        """A presigned GET URL, valid for ``presign_expires`` seconds."""
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=self.presign_expires,
        )

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests and the embedded demo; not normal use)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status(exc) != 404:
                raise
        region = self._client.meta.region_name
        extra = {}
        if region and region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **extra)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    def __repr__(self) -> str:
        return f"S3Storage({self.describe!r})"


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part, so it can be shown."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))

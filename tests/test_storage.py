"""Storage backends against real things: a temp directory and moto's S3 HTTP server."""

from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from moto.server import ThreadedMotoServer

from renderfarm.settings import Settings
from storage import Storage, open_storage
from storage.local import LocalStorage
from storage.s3 import S3Storage
from tests.fault_fixtures import BrokenEndpoint

SECRET = "dummy-secret-key-for-tests"
BAD_KEYS = ["", "/abs/x.png", "../x.png", "a/../../x.png", "a\\b.png", "a//b.png", "./x.png"]


@pytest.fixture(scope="module")
def aws_env():
    """Dummy credentials, and nothing from the developer's own AWS config."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "dummy-access-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def moto_endpoint(aws_env):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint) -> S3Storage:
    store = S3Storage(f"rf-{uuid.uuid4().hex[:12]}", "renders/", moto_endpoint, "us-east-1", 123)
    store.ensure_bucket()
    return store


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "images")


@pytest.fixture(params=["local", "s3"])
def store(request) -> Storage:
    return request.getfixturevalue(request.param)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- behaviour both backends share ---------------------------------------------------------


def test_put_get_roundtrip(store: Storage):
    assert isinstance(store, Storage)
    assert store.put("batch/job-0.png", b"png-bytes", "image/png") is True
    assert store.get("batch/job-0.png") == b"png-bytes"
    assert store.exists("batch/job-0.png")
    assert not store.exists("batch/job-1.png")


def test_second_put_returns_false_and_keeps_first(store: Storage):
    assert store.put("b/k.json", b"first", "application/json") is True
    assert store.put("b/k.json", b"second", "application/json") is False
    assert store.get("b/k.json") == b"first"


def test_get_missing_raises_key_error(store: Storage):
    with pytest.raises(KeyError) as info:
        store.get("nope/none.png")
    assert info.value.args == ("nope/none.png",)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(store: Storage, key: str):
    with pytest.raises(ValueError, match="storage key"):
        store.put(key, b"x", "image/png")
    with pytest.raises(ValueError, match="storage key"):
        store.get(key)


def test_list_and_delete(store: Storage):
    for key in ["b2/z.png", "b1/job-1.png", "b1/job-0.png", "b1/sub/x.json", "b10/y.png"]:
        store.put(key, b"x", "image/png")
    assert store.list() == sorted(
        ["b1/job-0.png", "b1/job-1.png", "b1/sub/x.json", "b10/y.png", "b2/z.png"]
    )
    assert store.list("b1/") == ["b1/job-0.png", "b1/job-1.png", "b1/sub/x.json"]
    assert store.list("b1") == ["b1/job-0.png", "b1/job-1.png", "b1/sub/x.json", "b10/y.png"]
    assert store.list("b1/job-") == ["b1/job-0.png", "b1/job-1.png"]
    assert store.list("missing/") == []
    store.delete("b1/job-0.png")
    store.delete("b1/job-0.png")  # absent: no error
    assert not store.exists("b1/job-0.png")
    assert store.list("b1/job") == ["b1/job-1.png"]


# --- local ---------------------------------------------------------------------------------


def test_local_url_is_absolute_path_and_no_temp_files_left(local: LocalStorage):
    local.put("a/b.png", b"data", "image/png")
    path = Path(local.url("a/b.png"))
    assert path.is_absolute() and path.read_bytes() == b"data"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.png"]
    assert local.describe == str(local.root)


def test_local_concurrent_puts_exactly_one_wins(local: LocalStorage):
    n = 16
    barrier = threading.Barrier(n)
    results: dict[int, bool] = {}

    def put(i: int) -> None:
        barrier.wait()
        results[i] = local.put("race/job-0.png", f"writer-{i}".encode() * 1000, "image/png")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    winners = [i for i, won in results.items() if won]
    assert len(results) == n and len(winners) == 1
    assert local.get("race/job-0.png") == f"writer-{winners[0]}".encode() * 1000
    assert local.list("race/") == ["race/job-0.png"]


# --- S3 ------------------------------------------------------------------------------------


def test_s3_content_type_and_prefix(s3: S3Storage):
    s3.put("b/job-0.png", b"png", "image/png")
    s3.put("b/job.json", b"{}", "application/json")
    head = s3._client.head_object(Bucket=s3.bucket, Key="renders/b/job-0.png")
    assert head["ContentType"] == "image/png"
    head = s3._client.head_object(Bucket=s3.bucket, Key="renders/b/job.json")
    assert head["ContentType"] == "application/json"


def test_s3_presigned_url_downloads_and_expires_as_configured(s3: S3Storage):
    s3.put("b/job-0.png", b"\x89PNG...", "image/png")
    url = s3.url("b/job-0.png")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["123"]
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"\x89PNG..."


def test_s3_describe_has_no_secret(s3: S3Storage, moto_endpoint: str):
    assert s3.describe == f"s3://{s3.bucket}/renders/ at {moto_endpoint}"
    assert SECRET not in s3.describe and SECRET not in repr(s3)
    with_userinfo = S3Storage("bucket", "", "http://user:pw@127.0.0.1:9")
    assert "pw" not in with_userinfo.describe


def test_s3_prefix_normalised(moto_endpoint: str):
    for prefix, expected in [("", ""), ("/", ""), ("p", "p/"), ("/p/q/", "p/q/")]:
        assert S3Storage("bucket", prefix, moto_endpoint).prefix == expected


def test_s3_concurrent_puts_exactly_one_wins(s3: S3Storage):
    """First writer wins against a real endpoint: of 12 writers racing to one key, exactly one
    put answers True and its bytes are the object; the others got 412 (or 409 and then found
    the object there)."""
    n = 12
    barrier = threading.Barrier(n)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def put(i: int) -> None:
        barrier.wait()
        try:
            results[i] = s3.put("race/job-0.png", f"writer-{i}".encode() * 5000, "image/png")
        except BaseException as exc:  # noqa: B036 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    winners = [i for i, won in results.items() if won]
    assert len(results) == n and len(winners) == 1, results
    assert s3.get("race/job-0.png") == f"writer-{winners[0]}".encode() * 5000
    assert s3.list("race/") == ["race/job-0.png"]
    assert s3.put("race/job-0.png", b"late", "image/png") is False  # 412 once it is there


def test_s3_put_retries_until_endpoint_comes_up(s3: S3Storage, moto_endpoint: str):
    """The endpoint drops the put's first two connections (down), then serves (up): boto3's
    retries carry the put through, and it succeeds."""
    port = free_port()
    late = S3Storage(s3.bucket, "renders/", f"http://127.0.0.1:{port}", "us-east-1")
    moto_port = int(moto_endpoint.rsplit(":", 1)[1])
    broken = BrokenEndpoint(port, drop=2, forward_to=moto_port)
    try:
        assert late.put("late/job-0.png", b"late", "image/png") is True
    finally:
        broken.close()
    assert broken.connections >= 3  # two dropped, then the one that got through
    assert s3.get("late/job-0.png") == b"late"


# --- open_storage --------------------------------------------------------------------------


def test_open_storage_picks_backend(tmp_path: Path, moto_endpoint: str):
    local = open_storage(Settings(storage_url=(tmp_path / "my images").as_uri()))
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "my images"
    default = open_storage(Settings(data_dir=tmp_path))
    assert isinstance(default, LocalStorage) and default.root == tmp_path / "images"
    s3 = open_storage(
        Settings(
            storage_url="s3://my-bucket/renders", s3_endpoint_url=moto_endpoint,
            s3_region="eu-west-1", presign_expires=60,
        )
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.presign_expires) == ("my-bucket", "renders/", 60)
    assert s3._client.meta.region_name == "eu-west-1"


@pytest.mark.parametrize(
    "url",
    ["images", "/abs/dir", "file://relative/dir", "http://x/y", "s3://", "s3://Bad_Bucket/p",
     "gs://bucket/p"],
)
def test_open_storage_rejects_bad_urls(url: str):
    with pytest.raises(ValueError, match="RENDERFARM_STORAGE_URL") as info:
        open_storage(Settings(storage_url=url))
    assert repr(url) in str(info.value)

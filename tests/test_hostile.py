"""Hostile input: a pickle message in the queue, poisoned init images, and the dashboard's API
fuzzed against its own OpenAPI document, probed without a token, and crawled for secrets."""

from __future__ import annotations

import base64
import io
import os
import re
import struct
import time
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from renderfarm.errors import InvalidJob
from renderfarm.images import MAX_INIT_IMAGE_BYTES
from renderfarm.schema import JobState
from tests.fault_fixtures import wait_for

pytest_plugins = ["tests.fault_fixtures"]

JOB = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "scheduler": "euler"}


# -- a pickle message -------------------------------------------------------------------------
class _Bomb:
    """Unpickling this creates ``path``: proof that pickle from the broker was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_message_is_discarded_never_executed(make_fault_farm, tmp_path):
    """On a farm of its own: the pickle goes into no queue another module's worker serves."""
    from celery import Celery

    from renderfarm.connection import TASK_NAME

    ff = make_fault_farm(workers=1)
    marker = tmp_path / "unpickled"
    hostile = Celery("hostile", broker=ff.settings.redis_url, set_as_current=False)
    hostile.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    queue = f"{ff.settings.queue}.tiny"  # the queue the farm's worker consumes
    hostile.send_task(TASK_NAME, args=(_Bomb(str(marker)),), queue=queue, serializer="pickle")
    wait_for(lambda: "untrusted content of type pickle" in ff.log(0), 30,
             "the worker logging the refused pickle message")
    assert not marker.exists()
    after = ff.client.submit({**JOB, "prompt": "served after the pickle"}).wait(timeout=60)
    assert after.state is JobState.succeeded, after.error
    assert not marker.exists()
    hostile.close()


# -- init images ------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _chunk(b"IEND", b""))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


def _encoded(kind: str, size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, kind)
    return out.getvalue()


NOT_ACCEPTED = "is not an image in an accepted format: PNG, JPEG or WebP"
OTHER_FORMATS = ["BMP", "TIFF", "ICO", "TGA", "PCX", "GIF", "PPM", "DIB", "SGI"]
# An EPS that would reach Ghostscript if Pillow opened it as EPS
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n"


@pytest.fixture
def idle_client(farm_settings, module_redis_url):
    """A client of a farm with no workers, on its own Redis database (emptied first)."""
    from producer import FarmClient

    client = FarmClient(farm_settings.model_copy(update={"redis_url": module_redis_url}))
    client.redis.flushdb()
    return client


@pytest.mark.parametrize("image, reason", [
    (_b64(png_claiming(30000, 30000)), "decompression bomb"),
    (_b64(png_claiming(10000, 10000)), "decompression bomb"),  # Pillow only warns: an error here
    (_b64(png_claiming(3000, 3000)), "over the limit"),
    (_b64(_png(2056, 2056)), "over the limit"),
    (_b64(b"MZ\x90\x00 this is not an image at all"), NOT_ACCEPTED),
    ("data:image/png;base64," + "A" * (MAX_INIT_IMAGE_BYTES * 4 // 3 + 8), "MiB limit"),
    ("not base64 at all!", "not valid base64"),
    *[(_b64(_encoded(kind)), NOT_ACCEPTED) for kind in OTHER_FORMATS],
    (_b64(EPS), NOT_ACCEPTED),
], ids=["bomb-900M", "bomb-100M", "9M-pixels", "real-2056px", "non-image", "over-8MiB", "junk",
        *OTHER_FORMATS, "EPS"])
def test_hostile_init_image_refused_nothing_enqueued(idle_client, image, reason):
    job = {**JOB, "mode": "img2img", "prompt": "hostile", "init_image": image}
    with pytest.raises(InvalidJob) as caught:
        idle_client.submit(job)
    [error] = caught.value.errors
    assert error.field == "init_image"
    assert reason in error.message, error.message
    assert len(str(error)) < 400  # the reason, not the payload
    assert idle_client.records.count_jobs() == 0
    assert idle_client.records.count_batches() == 0
    assert not [k for k in idle_client.redis.scan_iter("renderfarm*")]


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_documented_init_image_formats_accepted(idle_client, kind):
    job = {**JOB, "mode": "img2img", "prompt": "fine", "init_image": _b64(_encoded(kind))}
    idle_client.submit(job)
    assert idle_client.records.count_jobs() == 1


@pytest.fixture
def count_decodes(monkeypatch):
    """``count_decodes()``: how many times an init image was opened since the fixture began."""
    from renderfarm import images

    calls = []
    real = images.open_image

    def counting(data: bytes):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(images, "open_image", counting)
    return lambda: len(calls)


def _unique_png(size: int = 2048) -> str:
    """A 4-Mpx PNG, small once compressed (one colour but a patch of random pixels), that no
    other test made, so no earlier check of it can be reused."""
    img = Image.new("RGB", (size, size), (20, 90, 160))
    img.paste(Image.frombytes("RGB", (16, 16), os.urandom(16 * 16 * 3)), (0, 0))
    return _b64(_encoded_bytes(img))


def _encoded_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_shared_init_image_decoded_once_per_batch(idle_client, count_decodes):
    image = _unique_png()
    jobs = [{**JOB, "mode": "img2img", "prompt": f"job {n}", "init_image": image}
            for n in range(400)]
    idle_client.submit_batch(jobs)
    assert idle_client.records.count_jobs() == 400
    assert count_decodes() == 1


def test_shared_init_image_decoded_once_per_api_request(idle_client, count_decodes):
    from dashboard import create_app

    app = create_app({"TESTING": True, "SETTINGS": idle_client.settings})
    image, other = _unique_png(), _unique_png()
    jobs = [{**JOB, "mode": "img2img", "prompt": f"job {n}",
             "init_image": other if n == 7 else image} for n in range(400)]
    rv = app.test_client().post("/api/v1/batches", json={"jobs": jobs})
    assert rv.status_code == 201, rv.get_json()
    assert count_decodes() == 2
    # and a bad image shared by many jobs is refused for each of them, decoded once
    bmp = io.BytesIO()
    Image.frombytes("RGB", (16, 16), os.urandom(16 * 16 * 3)).save(bmp, "BMP")
    bad = _b64(bmp.getvalue())
    jobs = [{**JOB, "mode": "img2img", "prompt": "x", "init_image": bad} for _ in range(50)]
    rv = app.test_client().post("/api/v1/batches", json={"jobs": jobs})
    assert rv.status_code == 400
    errors = rv.get_json()["errors"]
    assert len(errors) == 50 and all("init_image" in e["field"] for e in errors)
    assert count_decodes() == 3


# -- the dashboard's API ----------------------------------------------------------------------
dashboard = pytest.importorskip("dashboard")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import settings  # noqa: E402

TOKEN = "hostile-test-token"
#: examples per API operation and mode: 40 in the suite (about 10 s on 2 cores; hypothesis'
#: health checks on). 100-150 with negative cases found the two failures kept below as
#: regular tests (2026-11-28); 300 valid ones found nothing. Hunt with more:
#: FUZZ_EXAMPLES=500 pytest tests/test_hostile.py -k fuzzed
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"/|\.py\", line \d+")


@pytest.fixture
def fuzz_app(idle_client, tmp_path):
    """The dashboard on a farm with no workers (jobs the fuzzer submits just wait)."""
    from dashboard import create_app

    models = tmp_path / "models" / "tiny"
    models.mkdir(parents=True)
    (models / "model_index.json").write_text("{}")
    farm_settings = idle_client.settings.model_copy(
        update={"models_dir": tmp_path / "models", "storage_url": (tmp_path / "img").as_uri()})
    return create_app({"TESTING": True, "SETTINGS": farm_settings})


@pytest.fixture
def api_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)


def _has_input_to_get_wrong(operation) -> bool:
    """A body, a query or a header: something a negative case can make invalid (a path
    parameter is any string, so an operation with nothing else has no invalid input)."""
    return bool(operation.body) or any(p.location.value != "path"
                                       for p in operation.iter_parameters())


def test_api_fuzzed_no_5xx_no_traceback(api_schema):
    """Every operation of /api/v1/openapi.json with cases schemathesis generates from it: valid
    ones, and invalid ones (negative mode) where the operation has input to get wrong, which
    must be refused (schemathesis' ``negative_data_rejection``: a 4xx, except where the invalid
    part is one an API may ignore, such as an unknown query parameter)."""
    from schemathesis import GenerationMode
    from schemathesis.checks import negative_data_rejection

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    runs = [(op, GenerationMode.POSITIVE, []) for op in operations]
    runs += [(op, GenerationMode.NEGATIVE, [negative_data_rejection]) for op in operations
             if _has_input_to_get_wrong(op)]
    assert len(runs) >= len(operations) + 4

    for operation, mode, checks in runs:
        _fuzz(operation, mode, checks)


def _fuzz(operation, mode, checks) -> None:
    from hypothesis import given

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    def check(case) -> None:
        response = case.call()
        where = (case.method, case.formatted_path, response.text[:300])
        assert response.status_code < 500, where
        assert not TRACEBACK.search(response.text), where
        if checks:
            case.validate_response(response, checks=checks)

    check()


# Failures the fuzzer found, kept as regular tests
def test_an_empty_last_event_id_is_as_if_not_sent_and_the_document_says_so(fuzz_app):
    """The document refused an empty Last-Event-ID that the server accepts (as no id: the
    stream starts with a snapshot)."""
    http = fuzz_app.test_client()
    made = http.post("/api/v1/batches", json={"jobs": [{**JOB, "prompt": "never rendered"}]})
    batch_id = made.get_json()["batch"]["id"]
    spec = http.get("/api/v1/openapi.json").get_json()
    [header] = [p for p in spec["paths"]["/batches/{batch_id}/events"]["get"]["parameters"]
                if p["name"] == "Last-Event-ID"]
    assert re.match(header["schema"]["pattern"], "")
    assert not re.match(header["schema"]["pattern"], "yesterday")
    with http.get(f"/api/v1/batches/{batch_id}/events", headers={"Last-Event-ID": ""},
                  buffered=False) as response:
        assert response.status_code == 200
        chunks = iter(response.response)
        assert next(chunks).startswith(b"retry:")
        assert b"event: snapshot" in next(chunks)


def test_body_over_limit_is_413(fuzz_app):
    http = fuzz_app.test_client()
    body = b'{"jobs": [' + b" " * (fuzz_app.config["MAX_CONTENT_LENGTH"] + 10) + b"]}"
    response = http.post("/api/v1/batches", data=body, content_type="application/json")
    assert response.status_code == 413
    assert not TRACEBACK.search(response.get_data(as_text=True))


def _api_routes(app) -> list[tuple[str, str]]:
    spec = app.test_client().get("/api/v1/openapi.json",
                                 headers={"Authorization": f"Bearer {TOKEN}"}).get_json()
    routes = []
    for path, ops in spec["paths"].items():
        for method in ops:
            if method in ("get", "post", "put", "patch", "delete"):
                routes.append((method.upper(), "/api/v1" + re.sub(r"\{[^}]+\}", "x1", path)))
    return routes


def test_token_required_on_every_api_route(idle_client, tmp_path):
    from dashboard import create_app

    app = create_app({"TESTING": True, "SETTINGS": idle_client.settings, "TOKEN": TOKEN,
                      "SECRET_KEY": "k" * 32})
    http = app.test_client()
    routes = _api_routes(app)
    assert len(routes) >= 10
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = http.open(path, method=method, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.status_code)


def test_no_secret_anywhere_and_presigned_urls_expire(farm, farm_settings):
    from dashboard import create_app

    expires = 120
    settings_ = farm_settings.model_copy(update={"presign_expires": expires})
    app = create_app({"TESTING": True, "SETTINGS": settings_, "TOKEN": TOKEN,
                      "SECRET_KEY": "k" * 32})
    http = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    made = http.post("/api/v1/batches", headers=auth, json={"jobs": [
        {**JOB, "prompt": "find the secret", "seed": 1},
        {**JOB, "prompt": "find it again", "seed": 2}]})
    assert made.status_code == 201, made.get_data(as_text=True)
    batch_id, job_ids = made.get_json()["id"], made.get_json()["job_ids"]
    deadline = time.monotonic() + 90
    while True:
        batch = http.get(f"/api/v1/batches/{batch_id}", headers=auth).get_json()
        if batch["batch"]["counts"].get("succeeded") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert batch["batch"]["counts"].get("succeeded") == 2, batch["batch"]

    pages = ["/", "/batches", f"/batches/{batch_id}", f"/batches/{batch_id}/images.zip",
             "/workers", "/queues", "/submit", "/login"] + [f"/jobs/{j}" for j in job_ids]
    api = ["/api/v1/batches", f"/api/v1/batches/{batch_id}", "/api/v1/workers",
           "/api/v1/queues", "/api/v1/models", "/api/v1/openapi.json"]
    api += [f"/api/v1/jobs/{j}" for j in job_ids]
    for path in pages + api:
        response = http.get(path, headers=auth)
        assert response.status_code < 400, (path, response.status_code)
        assert SECRET.encode() not in response.get_data(), path
    urls = [r["url"] for j in job_ids
            for r in http.get(f"/api/v1/jobs/{j}", headers=auth).get_json()["results"]]
    assert len(urls) == 2
    for url in urls:
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Expires"] == [str(expires)]
        assert SECRET not in url


def test_presigned_urls_default_to_one_hour(farm_settings):
    from storage import open_storage

    url = open_storage(farm_settings.model_copy(update={"presign_expires": 3600})).url("a/b.png")
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["3600"]
    from renderfarm.settings import Settings

    assert Settings.model_fields["presign_expires"].default == 3600

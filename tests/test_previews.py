"""Live previews (worker/previews.py): latents -> RGB with the family's factors, a JPEG per
rendering job in Redis, served at GET /api/v1/jobs/<id>/preview.

The farm tests run one real worker with test holds (worker/testhooks.py): a job stops at a
denoising step, and the test reads its preview while it is provably rendering. The worker runs
with ``preview_method="taesd"`` and a models folder of its own: without TAESD weights there
(most tests) its previews are linear; the TAESD test puts random ones in for its jobs."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid

import numpy
import PIL.Image
import pytest
import redis
import torch

from renderfarm import keys
from renderfarm.embedded import EmbeddedRedis
from renderfarm.schema import JobState
from renderfarm.settings import Settings
from tests.fault_fixtures import FAULT_BUCKET, FaultFarm, wait_for
from worker import taesd, testhooks
from worker.families import family_named, family_of_folder
from worker.previews import Previews, encode_jpeg, latents_to_rgb, preview_size, unpack


def test_preview_size_is_the_latent_size_capped_at_64():
    assert preview_size(128, 64) == (16, 8)
    assert preview_size(512, 512) == (64, 64)
    assert preview_size(1024, 768) == (64, 48)
    assert preview_size(1216, 832) == (64, 44)


def test_latents_to_rgb_is_factors_and_bias_mapped_to_bytes():
    family = family_named("sd15")
    latents = torch.zeros(1, 4, 1, 4)
    for channel in range(4):
        latents[0, channel, 0, channel] = 1.0  # pixel k: channel k alone
    rgb = latents_to_rgb(latents, family.latent_rgb_factors, family.latent_rgb_bias, (4, 1))
    assert rgb.shape == (1, 1, 4, 3) and rgb.dtype == torch.uint8
    # ComfyUI's LatentFormat SD15 factors, (x + 1) / 2 * 255
    expected = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
    for k in range(4):
        want = [round((v + 1) / 2 * 255) for v in expected[k]]
        assert rgb[0, 0, k].tolist() == want


@pytest.fixture(scope="module")
def preview_redis(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("preview-redis"))
    url = server.start()
    yield redis.Redis.from_url(url)
    server.stop()


def _color(data: bytes) -> tuple[int, ...]:
    image = PIL.Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.convert("RGB").getpixel((image.width // 2, image.height // 2))


def test_an_sdxl_model_previews_with_sdxl_factors(tmp_path, preview_redis):
    from worker.familygen import make

    family = family_of_folder(make("tiny-sdxl", tmp_path / "tiny-sdxl"))
    assert family.name == "sdxl"
    hook = Previews(preview_redis, every=1.0).hook(["sdxl-job"], family, 64, 64)
    latents = torch.zeros(1, 4, 8, 8)
    latents[:, 0] = 1.0  # channel 0 alone, everywhere: one flat colour
    hook(latents, [0])
    data = wait_for(lambda: preview_redis.get(keys.preview("sdxl-job")), 10, "the preview")
    assert 0 < preview_redis.ttl(keys.preview("sdxl-job")) <= 30
    # SDXL (ComfyUI LatentFormat SDXL): factors[0] + bias = (0.4735, 0.4057, 0.4330) -> bytes
    # (188, 179, 183); SD 1.5's factors would give (172, 157, 169). JPEG may be off by a few.
    want = (188, 179, 183)
    got = _color(data)
    assert all(abs(g - w) <= 3 for g, w in zip(got, want, strict=True)), got


def test_flux_latents_are_unpacked_as_diffusers_packs_them():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 12)
    assert torch.equal(unpack(packed, 12 * 8, 8 * 8), latents)


# -- TAESD (worker/taesd.py) ------------------------------------------------------------------
def test_a_comfyui_decoder_file_decodes_as_the_diffusers_folder(tmp_path):
    """ComfyUI's / A1111's ``taesd_decoder.safetensors`` (madebyollin's layer indices) loads
    into the same decoder as diffusers' AutoencoderTiny folder; a folder wins over a file."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    folder = taesd.make_random("taesd", tmp_path / "hub" / "taesd", seed=3)
    layers = AutoencoderTiny.from_pretrained(folder).decoder.layers.state_dict()
    (tmp_path / "vae_approx").mkdir()
    file = tmp_path / "vae_approx" / "taesd_decoder.safetensors"
    save_file({f"{int(k.split('.', 1)[0]) + 1}.{k.split('.', 1)[1]}": v
               for k, v in layers.items()}, file)
    assert taesd.find(tmp_path, "taesd") == file
    assert taesd.find(tmp_path, "taesdxl") is None
    latents = torch.randn(1, 4, 4, 8)  # small: this decoder has TAESD's real size
    from_file = taesd.Decoder("taesd", file).decode(latents, (64, 32))
    assert from_file.shape == (1, 32, 64, 3) and from_file.dtype == torch.uint8
    assert from_file.float().std() > 5  # a picture, not a flat field
    assert torch.equal(from_file, taesd.Decoder("taesd", folder).decode(latents, (64, 32)))
    shutil.copytree(folder, tmp_path / "vae_approx" / "taesd")
    assert taesd.find(tmp_path, "taesd") == tmp_path / "vae_approx" / "taesd"
    wrong = tmp_path / "vae_approx" / "taesdxl_decoder.safetensors"
    save_file({"1.weight": torch.zeros(8, 4, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="taesdxl_decoder.safetensors: not a taesdxl decoder"):
        taesd.load_decoder(wrong, "taesdxl")


def test_flux_previews_with_taef1_decode_its_unpacked_16_channels(tmp_path, preview_redis):
    """taef1 takes Flux's 16 latent channels, unpacked from the pipeline's 2x2 patches as
    diffusers' FluxPipeline._unpack_latents does: the stored preview is the decode of the
    unpacked latents, 8x their size."""
    from diffusers import FluxPipeline

    taesd.make_random("taef1", tmp_path / "vae_approx" / "taef1", seed=4, small=True)
    previews = Previews(preview_redis, every=1.0, method="taesd", models_dir=tmp_path)
    hook = previews.hook(["flux-job"], family_named("flux"), 128, 64)
    latents = torch.randn(1, 16, 8, 16)
    hook(FluxPipeline._pack_latents(latents, 1, 16, 8, 16), [0])
    data = wait_for(lambda: preview_redis.get(keys.preview("flux-job")), 30, "the preview")
    assert PIL.Image.open(io.BytesIO(data)).size == (128, 64)  # latents 16x8, times 8
    decoder = previews.decoder(family_named("flux"))
    assert data == encode_jpeg(decoder.decode(latents, (128, 64))[0])


def test_taesd_previews_are_spaced_to_keep_their_decodes_under_2_percent(tmp_path,
                                                                         preview_redis):
    """A group's next TAESD preview comes no sooner than its decode time / 2 %: with a decode
    measured at an hour, the preview after the next is skipped (previews due every 1 us)."""
    taesd.make_random("taesd", tmp_path / "vae_approx" / "taesd", seed=6, small=True)
    previews = Previews(preview_redis, every=1e-6, method="taesd", models_dir=tmp_path)
    family = family_named("sd15")
    hook = previews.hook(["spaced"], family, 64, 64)
    decoder = previews.decoder(family)
    a, b, c = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    hook(a, [0])
    assert previews.writer.flush(30)
    decoder.seconds = 3600.0  # as if a decode took an hour
    hook(b, [0])  # due (spaced by the decode time known at the call before): written
    assert previews.writer.flush(30)
    hook(c, [0])  # not due for 3600 / 0.02 s: skipped
    assert previews.writer.flush(30)
    stored = preview_redis.get(keys.preview("spaced"))
    assert preview_redis.ttl(keys.preview("spaced")) > 3600  # lives until the next is due
    assert stored == encode_jpeg(decoder.decode(b, (64, 64))[0])
    assert stored != encode_jpeg(decoder.decode(c, (64, 64))[0])


def test_without_taesd_weights_previews_are_linear_said_once(tmp_path, preview_redis, caplog):
    previews = Previews(preview_redis, every=1.0, method="taesd", models_dir=tmp_path)
    family = family_named("sd15")
    with caplog.at_level(logging.INFO, logger="renderfarm.worker"):
        for job_id in ("linear-1", "linear-2"):
            previews.hook([job_id], family, 128, 64)(torch.randn(1, 4, 8, 16), [0])
    data = wait_for(lambda: preview_redis.get(keys.preview("linear-2")), 10, "the preview")
    assert PIL.Image.open(io.BytesIO(data)).size == (16, 8)  # linear: the latent size
    said = [r.getMessage() for r in caplog.records if "taesd" in r.getMessage()]
    assert len(said) == 1 and "no taesd weights for sd15 models" in said[0], said
    assert "linear previews instead" in said[0] and str(tmp_path / "vae_approx") in said[0]
    with pytest.raises(ValueError, match="preview method must be one of linear, taesd"):
        Previews(preview_redis, every=1.0, method="vae")


# -- previews and job records (no worker: the records moved by hand) --------------------------
def _queued_jobs(records, batch_id: str, n: int) -> list[str]:
    """``n`` queued jobs of batch ``batch_id``, on a queue no worker reads."""
    from producer.client import new_id
    from renderfarm.schema import JobRequest

    request = JobRequest(prompt="a queued one", model="tiny", width=64, height=64, steps=2)
    return records.add_jobs(batch_id, [(new_id(), request) for _ in range(n)],
                            queues=["nobody"] * n)


def test_a_picture_is_written_only_while_its_attempt_runs(preview_redis):
    """A worker's picture of a job (PreviewWriter.put with its Attempt) is written while that
    attempt runs; the job's end deletes it (records.py ``move``), and a picture of the ended
    attempt, queued in the preview thread, is dropped: never written after the end, nor during
    the job's next attempt (retried, taken by the same worker)."""
    from renderfarm.records import Records
    from worker.previews import Attempt, PreviewWriter

    records = Records(preview_redis)
    [job_id] = _queued_jobs(records, "attempts", 1)
    key = keys.preview(job_id)
    writer = PreviewWriter(preview_redis)
    pixels = torch.zeros(8, 8, 3, dtype=torch.uint8)

    def put(attempt: Attempt) -> bytes | None:
        writer.put(job_id, pixels, "attempts", attempt=attempt)
        assert writer.flush(30)
        return preview_redis.get(key)

    def claim() -> Attempt:
        assert records.claim(job_id, "worker-a", 60, 3).ok
        return Attempt.of("worker-a", records.job(job_id))

    first = claim()
    assert put(Attempt("worker-b", first.attempts, first.started)) is None  # not its owner
    assert put(first) is not None
    assert records.fail(job_id, "worker-a", "boom") == "ok"
    assert preview_redis.get(key) is None  # deleted with the move to failed
    assert put(first) is None  # a late picture of the ended attempt
    assert records.retry(job_id)
    second = claim()  # a retry counts attempts afresh: this one is number 1 again
    assert second.attempts == first.attempts and second.started != first.started
    assert put(first) is None  # the first attempt's, during the second
    assert put(second) is not None
    assert records.update(job_id, "worker-a", JobState.succeeded)[0] == "ok"
    assert preview_redis.get(key) is None


class Monitor:
    """Every command a real redis-server runs while this is open (Redis' MONITOR)."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.commands: list[str] = []
        self._stop = f"monitor-stop-{uuid.uuid4().hex}"

    def __enter__(self) -> Monitor:
        self.client.ping()  # connected before: the stop marker's connection is not counted
        own = redis.Redis(connection_pool=redis.ConnectionPool(
            **self.client.connection_pool.connection_kwargs))
        self._own = own
        self._monitor = own.monitor().__enter__()  # MONITOR is on when this returns
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while True:
            command = self._monitor.next_command()["command"]
            if self._stop in command:
                return
            self.commands.append(command)

    def __exit__(self, *exc) -> None:
        self.client.echo(self._stop)
        self._thread.join(30)
        self._monitor.__exit__(*exc)
        self._own.close()
        assert not self._thread.is_alive(), "MONITOR never saw the stop marker"


def test_a_streams_snapshot_reads_the_running_jobs_previews_not_every_jobs(tmp_path,
                                                                            preview_redis):
    """The snapshot of a batch's event stream sends its running jobs' previews, and costs the
    same Redis commands for a batch of 3,001 jobs as for one of 2 (each with one running):
    it reads the running jobs, never every job of the batch (dashboard/events.py)."""
    from dashboard import create_app
    from renderfarm.records import Records

    records = Records(preview_redis)
    big, small = _queued_jobs(records, "big", 3001), _queued_jobs(records, "small", 2)
    running = {"big": big[1234], "small": small[1]}
    for job_id in running.values():
        assert records.claim(job_id, "worker-a", 60, 3).ok
        preview_redis.set(keys.preview(job_id), f"picture of {job_id}", ex=60)
    address = preview_redis.connection_pool.connection_kwargs
    url = f"redis://:{address['password']}@{address['host']}:{address['port']}/0"
    settings = Settings(redis_url=url,
                        data_dir=tmp_path / "data", storage_url=(tmp_path / "images").as_uri())
    api = create_app({"TESTING": True, "SETTINGS": settings}).test_client()
    commands = {}
    api.get("/api/v1/batches/small").close()  # the app's connection and rate limits, set up
    for batch_id, job_id in running.items():
        with Monitor(preview_redis) as monitor:
            stream = api.get(f"/api/v1/batches/{batch_id}/events", buffered=False)
            try:
                events = _sse_events(stream, "preview")
            finally:
                stream.close()
        assert [e for e, _ in events] == ["snapshot", "preview"], events
        assert events[0][1]["total"] == {"big": 3001, "small": 2}[batch_id]
        assert events[1][1]["job_id"] == job_id
        assert base64.b64decode(events[1][1]["image"].partition(",")[2]) == (
            f"picture of {job_id}".encode())
        commands[batch_id] = monitor.commands
    queued = set(big) - {running["big"]}
    assert not [c for c in commands["big"] if any(i in c for i in queued)], commands["big"]
    assert len(commands["big"]) == len(commands["small"]), commands


# -- a real worker ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def held_farm(tmp_path_factory, models_dir, s3_endpoint):
    """One worker with test holds and micro-batches of up to 4 images, previews by TAESD where
    its models folder (the session's tiny model, linked) has the weights."""
    from storage.s3 import S3Storage

    tmp = tmp_path_factory.mktemp("previews")
    own_models = tmp / "models"
    own_models.mkdir()
    (own_models / "tiny").symlink_to(models_dir / "tiny", target_is_directory=True)
    S3Storage(FAULT_BUCKET, "", endpoint_url=s3_endpoint).ensure_bucket()
    server = EmbeddedRedis(tmp / "redis")
    settings = Settings(redis_url=server.start(), data_dir=tmp / "farm",
                        storage_url=f"s3://{FAULT_BUCKET}/{uuid.uuid4().hex[:8]}",
                        s3_endpoint_url=s3_endpoint, models_dir=own_models, lease_seconds=3,
                        max_batch=4, preview_method="taesd")
    farm = FaultFarm(settings, server, 1,
                     extra_env={testhooks.ENABLE_ENV: testhooks.ENABLE_VALUE}).start()
    yield farm
    farm.stop()


@pytest.fixture(scope="module")
def api(held_farm):
    from dashboard import create_app

    return create_app({"TESTING": True, "SETTINGS": held_farm.settings}).test_client()


def _job(prompt: str, seed: int) -> dict:
    return {"prompt": prompt, "model": "tiny", "width": 128, "height": 64, "steps": 8,
            "seed": seed, "scheduler": "euler"}


def _preview(api, job_id: str) -> bytes | None:
    answer = api.get(f"/api/v1/jobs/{job_id}/preview")
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200 and answer.content_type == "image/jpeg"
    return answer.data


def test_a_preview_appears_mid_render_at_the_expected_size(held_farm, api):
    prompt = f"a preview mid render {uuid.uuid4().hex[:6]}"
    hold = held_farm.hold_step(prompt, 4)
    job_id = held_farm.client.submit(_job(prompt, 1)).id
    try:
        assert held_farm.wait_held()[1:] == (job_id, 4)
        assert held_farm.client.records.job(job_id).state is JobState.rendering
        data = wait_for(lambda: _preview(api, job_id), 30, "a preview of the held job")
        image = PIL.Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.size == (16, 8)  # 128x64 -> latent 16x8
    finally:
        held_farm.release(hold)
    held_farm.wait_state(job_id, {JobState.succeeded})
    assert _preview(api, job_id) is None  # deleted as it ended, not left to expire


def test_a_job_without_a_preview_is_404(api):
    answer = api.get("/api/v1/jobs/no-such-job/preview")
    assert answer.status_code == 404
    assert answer.get_json()["errors"][0]["field"] == "job_id"


def test_each_job_of_a_micro_batch_gets_its_own_preview(held_farm, api):
    tag = uuid.uuid4().hex[:6]
    prompts = [f"a red barn {tag}", f"a blue lake {tag}"]
    holds = [held_farm.hold_step(p, 3) for p in prompts]
    batch = held_farm.client.submit_batch([_job(p, 10 + i) for i, p in enumerate(prompts)])
    try:
        held_farm.wait_held()
        records = [held_farm.client.records.job(i) for i in batch.job_ids]
        # one worker, both rendering at once: they share a pipeline call
        assert [r.state for r in records] == [JobState.rendering] * 2
        previews = [wait_for(lambda i=i: _preview(api, i), 30, f"a preview of {i}")
                    for i in batch.job_ids]
        assert previews[0] != previews[1]
        # The job page's stream: that job's events only; on connecting, its preview now.
        first, second = batch.job_ids
        live = api.get(f"/api/v1/batches/{batch.id}/events?job={second}", buffered=False)
        try:
            events = _sse_events(live, "preview")
        finally:
            live.close()
        assert [e for e, _ in events][0] == "snapshot"
        assert {d.get("job_id") for e, d in events[1:]} == {second}, events
        assert base64.b64decode(events[-1][1]["image"].partition(",")[2]) == previews[1]
        replay = api.get(f"/api/v1/batches/{batch.id}/events?job={second}", buffered=False,
                         headers={"Last-Event-ID": "0-0"})  # every event since the submit
        try:
            events = _sse_events(replay, "preview")
        finally:
            replay.close()
        kinds = {e for e, _ in events}  # its first preview may come before its first step
        assert {"job", "preview"} <= kinds <= {"job", "step", "preview"}, events
        assert {d["job_id"] for _, d in events} == {second}, events
        other = held_farm.client.submit(_job(f"another batch {tag}", 12))  # waits its turn
        wrong = api.get(f"/api/v1/batches/{batch.id}/events?job={other.id}")
        assert wrong.status_code == 400
        assert wrong.get_json()["errors"][0]["field"] == "job"
        assert api.get(f"/api/v1/batches/{batch.id}/events?job=nope").status_code == 404
    finally:
        held_farm.release(*holds)
    for job_id in [*batch.job_ids, other.id]:
        held_farm.wait_state(job_id, {JobState.succeeded})


def _sse_events(response, event: str, timeout: float = 60) -> list[tuple[str, dict]]:
    """Read a served SSE body until the first ``event``: the (event, data) pairs up to it. The
    body sends a keep-alive at least every 5 s, so the deadline is checked that often."""
    return [(name, data) for name, data, _ in _sse_with_ids(response, event, timeout)]


def _sse_with_ids(response, event: str, timeout: float = 60) -> list[tuple[str, dict, str]]:
    """:func:`_sse_events` with each event's id: (event, data, id) triples."""
    deadline = time.monotonic() + timeout
    text = ""
    for chunk in response.response:
        text += chunk.decode() if isinstance(chunk, bytes) else chunk
        events = []
        for block in text.split("\n\n")[:-1]:
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in lines:
                events.append((lines["event"], json.loads(lines["data"]), lines.get("id", "")))
            if lines.get("event") == event:
                return events
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {event} event in the stream: {text[-2000:]}")


def _sse_until(response, event: str, timeout: float = 60) -> dict:
    """The data of the first ``event`` of a served SSE body."""
    return _sse_events(response, event, timeout)[-1][1]


def test_a_preview_is_pushed_on_the_batch_event_stream(held_farm, api):
    prompt = f"a preview event {uuid.uuid4().hex[:6]}"
    hold = held_farm.hold_step(prompt, 3)
    batch = held_farm.client.submit_batch([_job(prompt, 3)])
    [job_id] = batch.job_ids
    try:
        assert held_farm.wait_held()[1] == job_id
        live = api.get(f"/api/v1/batches/{batch.id}/events", buffered=False,
                       headers={"Last-Event-ID": "0-0"})
        try:
            data = _sse_until(live, "preview")
        finally:
            live.close()
        assert data["job_id"] == job_id and data["url"] == f"/api/v1/jobs/{job_id}/preview"
        head, _, encoded = data["image"].partition(",")
        assert head == "data:image/jpeg;base64"
        image = PIL.Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "JPEG" and image.size == (16, 8)
    finally:
        held_farm.release(hold)
    held_farm.wait_state(job_id, {JobState.succeeded})


def test_a_streams_snapshot_sends_the_preview_of_a_job_mid_render(held_farm, api):
    """A client connecting (no Last-Event-ID) to a batch whose job is held mid-render gets the
    snapshot, then at once that job's current preview, as of the snapshot (same event id: not a
    newer picture's marker); once the job has ended, it has no preview."""
    prompt = f"a preview in a snapshot {uuid.uuid4().hex[:6]}"
    hold = held_farm.hold_step(prompt, 3)
    batch = held_farm.client.submit_batch([_job(prompt, 5)])
    [job_id] = batch.job_ids
    try:
        assert held_farm.wait_held()[1] == job_id
        wait_for(lambda: _preview(api, job_id), 30, "a preview of the held job")
        live = api.get(f"/api/v1/batches/{batch.id}/events", buffered=False)
        try:
            events = _sse_with_ids(live, "preview")
        finally:
            live.close()
        (first, _, snapshot_id), (kind, data, preview_id) = events
        assert (first, kind, data["job_id"]) == ("snapshot", "preview", job_id), events
        assert preview_id == snapshot_id
        image = PIL.Image.open(io.BytesIO(base64.b64decode(data["image"].partition(",")[2])))
        assert image.format == "JPEG" and image.size == (16, 8)
    finally:
        held_farm.release(hold)
    held_farm.wait_state(job_id, {JobState.succeeded})
    assert _preview(api, job_id) is None


CHROMIUM = "/usr/bin/chromium"


def test_chromium_shows_the_preview_in_the_tile_and_on_the_job_page(held_farm):
    """A real headless Chromium on the served dashboard: the tile of a job held mid-render
    (and its job page) show its live preview, pushed on the batch's event stream (a data: URL;
    neither page asks GET /api/v1/jobs/<id>/preview); once released, the job's image replaces
    the preview in its tile. The browser starts before the job is held: a held job's preview
    lives 30 s after its last write."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from dashboard import create_app
    from dashboard.serve import make_server

    server = make_server(create_app({"SETTINGS": held_farm.settings}), port=0)
    threading.Thread(target=server.run, name="preview-dashboard", daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    prompt = f"a preview in chromium {uuid.uuid4().hex[:6]}"
    hold = held_farm.hold_step(prompt, 3)
    released = False
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            try:
                asked: list[str] = []
                errors: list[str] = []
                pages = [browser.new_page(), browser.new_page()]
                for page in pages:
                    page.on("request", lambda r: asked.append(r.url))
                    page.on("pageerror", lambda exc: errors.append(str(exc)))
                tiles, job_page = pages
                tiles.goto(f"{base}/batches")
                batch = held_farm.client.submit_batch([_job(prompt, 4)])
                [job_id] = batch.job_ids
                assert held_farm.wait_held()[1] == job_id
                tiles.goto(f"{base}/batches/{batch.id}")
                job_page.goto(f"{base}/jobs/{job_id}")
                pushed = ("(sel) => { const i = document.querySelector(sel); return i && "
                          "i.complete && i.src.startsWith('data:image/jpeg;base64,') ? "
                          "i.naturalWidth : 0; }")
                tile = f'.tile[data-id="{job_id}"]'
                tiles.wait_for_function(f"() => ({pushed})({json.dumps(tile + ' img.preview')})"
                                        " === 16", timeout=30_000)  # 128x64 -> 16x8
                job_page.wait_for_function(f"() => ({pushed})('#job-images img.preview') === 16",
                                           timeout=30_000)
                held_farm.release(hold)
                released = True
                final = (f"() => {{ const t = document.querySelector({json.dumps(tile)}); "
                         "const i = t.querySelector('.thumb img:not(.preview)'); "
                         "return !t.querySelector('img.preview') && i && i.complete && "
                         "i.naturalWidth === 128; }")
                tiles.wait_for_function(final, timeout=60_000)
                polled = [u for u in asked if "/preview" in u and "/api/v1/jobs/" in u]
                assert not polled, polled
                assert not errors, errors
            finally:
                browser.close()
    finally:
        if not released:
            held_farm.release(hold)
        server.close()
    held_farm.wait_state(job_id, {JobState.succeeded})


def test_a_taesd_preview_when_its_weights_are_in_the_models_folder(held_farm, api):
    """The same job, held at the same step, before and after random TAESD weights are put in
    the worker's models folder: linear (16x8, the latent size) before, TAESD's 8x (128x64,
    the image size) after, a different picture; the worker says each once in its log."""
    prompt = f"a taesd preview {uuid.uuid4().hex[:6]}"
    weights = held_farm.settings.models_path / "vae_approx" / "taesd"

    def held_preview() -> bytes:
        hold = held_farm.hold_step(prompt, 3)
        job_id = held_farm.client.submit(_job(prompt, 7)).id
        try:
            assert held_farm.wait_held()[1] == job_id
            return wait_for(lambda: _preview(api, job_id), 30, f"a preview of {job_id}")
        finally:
            held_farm.release(hold)
            held_farm.wait_state(job_id, {JobState.succeeded})

    try:
        linear = PIL.Image.open(io.BytesIO(held_preview()))
        assert linear.size == (16, 8)
        taesd.make_random("taesd", weights, seed=5, small=True)
        image = PIL.Image.open(io.BytesIO(held_preview()))
        assert image.format == "JPEG" and image.size == (128, 64)
        small = numpy.asarray(image.convert("RGB").resize((16, 8), PIL.Image.BOX), "float32")
        flat = numpy.asarray(linear.convert("RGB"), "float32")
        assert abs(small - flat).mean() > 10  # not the linear picture, scaled up
        logs = held_farm.logs()
        assert logs.count("no taesd weights for sd15 models") == 1, logs[-3000:]
        assert logs.count(f"live previews of sd15 models: taesd from {weights}") == 1
    finally:
        shutil.rmtree(weights, ignore_errors=True)

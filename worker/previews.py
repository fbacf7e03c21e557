"""Live previews: a small picture of each running job, made from its latents while it renders.

No VAE: the current latents go through the model family's linear latent-to-RGB factors
(``Family.latent_rgb_factors`` / ``latent_rgb_bias``, ComfyUI's ``latent_formats.py``; its
previewer maps the result from [-1, 1] to bytes the same way). A few microseconds of tensor work
on the render thread (the latents are first shrunk to at most :data:`MAX_SIDE` pixels a side);
the JPEG encode and the Redis write run in a background thread (:class:`PreviewWriter`), which
keeps only the newest picture of each job when it falls behind, so a slow Redis never slows the
render.

The latest preview of a job is one small JPEG in Redis (``keys.preview``), expiring after
:data:`TTL` seconds; the dashboard serves it at
``GET /api/v1/jobs/<id>/preview``. Each write also appends a small ``preview`` marker (the job's
id, no image) to the job's batch event stream, which the batch's Server-Sent Events turn into a
``preview`` event carrying the picture (dashboard/events.py): the stream stays small, and a
client is told the moment a new picture is there.

Only a running attempt has a preview. The record scripts delete it in the same step as the job
leaves running (succeeded, failed, cancelled, queued again) and as an attempt starts
(renderfarm/records.py ``move``); and a worker's write is one script (:data:`_PUT`) that
checks first that the job is still running, held by that worker, in the attempt the picture
was made for: a picture still queued in the preview thread when its job ends (or ends and is
retried) is dropped, never written after the delete. ``RENDERFARM_PREVIEW_SECONDS`` sets how often
(per group of jobs rendered together; the first comes after the first step); 0 turns previews
off.

``RENDERFARM_PREVIEW_METHOD=taesd`` makes better previews with the family's tiny VAE
(worker/taesd.py) where its weights are in the models folder: up to 256 pixels a side, 8x the
(shrunk) latents. The render thread then only copies the job's latents; the decode runs in the
preview thread, one at a time, and a group's previews come no more often than keeps their
decodes under :data:`TAESD_SHARE` of the time. A family whose TAESD weights are missing gets
the linear preview, said once in the log. A1111 calls the two "Approx cheap" and "TAESD".
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from redis import Redis

from renderfarm import keys
from worker import taesd

log = logging.getLogger("renderfarm.worker")

MAX_SIDE = 64  #: longest side of a preview in pixels (never more than one pixel per latent)
TTL = 30  #: seconds a preview lives in Redis after its last write (or its next one's due time)
EVENTS_KEPT = 10_000  #: a batch stream's cap, as records.py's scripts trim it
QUALITY = 80  #: JPEG quality
METHODS = ("linear", "taesd")  #: ``RENDERFARM_PREVIEW_METHOD``
#: Most of the time a group's TAESD decodes may take: its next preview comes no sooner than
#: its decodes' time (as last measured) / TAESD_SHARE (the issue's 2 % cost target).
TAESD_SHARE = 0.02

#: ``on_latents(latents, owners)``: the latents of one pipeline call after a step, and for each
#: row the index (in the group) of the job it belongs to.
OnLatents = Callable[[torch.Tensor, Sequence[int]], None]


def preview_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the preview of a ``width`` x ``height`` image: its latent size (1/8),
    scaled down to at most :data:`MAX_SIDE` a side, keeping the aspect ratio."""
    w, h = max(1, width // 8), max(1, height // 8)
    scale = min(1.0, MAX_SIDE / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def unpack(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, C, h, w) latents. Flux's pipeline holds them packed in 2x2 patches as
    (B, h/2 * w/2, C*4) (diffusers' ``FluxPipeline._unpack_latents``); others already are."""
    if latents.ndim == 4:
        return latents
    b, _, packed = latents.shape
    h, w = 2 * (height // 16), 2 * (width // 16)
    x = latents.view(b, h // 2, w // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, packed // 4, h, w)


def latents_to_rgb(latents: torch.Tensor, factors: Sequence[Sequence[float]],
                   bias: Sequence[float], size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 on the CPU, ``size`` = (W, H): shrunk first
    (area average), then ``rgb = latent @ factors + bias`` mapped from [-1, 1] to 0..255."""
    if not factors:
        raise ValueError("this model family has no latent_rgb_factors: no preview")
    x = latents.detach().float()
    if x.shape[1] != len(factors):
        raise ValueError(f"latents have {x.shape[1]} channels, the family's latent_rgb_factors "
                         f"{len(factors)}")
    if (x.shape[3], x.shape[2]) != size:
        x = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="area")
    f = torch.tensor(factors, dtype=x.dtype, device=x.device)
    rgb = torch.einsum("bchw,cr->bhwr", x, f) + torch.tensor(bias, dtype=x.dtype, device=x.device)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def encode_jpeg(pixels: torch.Tensor) -> bytes:
    """One (H, W, 3) uint8 picture as JPEG bytes."""
    out = io.BytesIO()
    PIL.Image.fromarray(pixels.numpy(), "RGB").save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


#: Makes a job's (H, W, 3) uint8 picture, in the preview thread.
MakePixels = Callable[[], torch.Tensor]

# KEYS: job, preview, its batch's event stream. ARGV: owner, attempts, start time, JPEG, ttl,
# job id, whether to append the marker (1|0), the stream's cap. Writes the picture (then its
# marker: a reader of the marker finds it) only while the job is running, held by ``owner``, in
# the attempt the picture was made in; returns 1 if written, 0 if not. An attempt is its count
# and its start time together: a retry resets the count (records.py ``_RETRY``), and a job
# claimed again in ``started`` keeps its start time.
_PUT = """
local state = redis.call('HGET', KEYS[1], 'state')
if (state ~= 'started' and state ~= 'rendering' and state ~= 'uploading')
    or redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2]
    or tonumber(redis.call('HGET', KEYS[1], 't:started') or '') ~= tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
if ARGV[7] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'job', ARGV[6], 'preview', 1)
end
return 1
"""


@dataclass(frozen=True)
class Attempt:
    """The attempt of a job a picture is of: the worker holding it (its lease owner), and the
    job's ``attempts`` and ``timestamps["started"]`` as that worker claimed it."""

    owner: str
    attempts: int
    started: float

    @classmethod
    def of(cls, owner: str, record) -> Attempt:
        """The attempt of ``record`` (a JobRecord read after ``owner`` claimed it)."""
        return cls(owner, record.attempts, record.timestamps.get("started", -1.0))


class PreviewWriter:
    """Makes, encodes and stores previews in a background thread. :meth:`put` never blocks: a
    job's picture replaces its older one not yet written, so at most one picture per job waits
    and the thread never falls further behind than one round of the running jobs."""

    def __init__(self, redis: Redis):
        self.redis = redis
        self._pending: dict[str, tuple[torch.Tensor | MakePixels, str, int,
                                       Attempt | None]] = {}
        self._put = redis.register_script(_PUT)
        self._ready = threading.Condition()
        self._busy = False  # a picture is being made or written
        self._thread = threading.Thread(target=self._loop, name="previews", daemon=True)
        self._thread.start()

    def put(self, job_id: str, pixels: torch.Tensor | MakePixels, batch_id: str = "",
            ttl: int = TTL, attempt: Attempt | None = None) -> None:
        """Queue a job's picture (or what makes it, called in the preview thread); with
        ``batch_id``, a marker goes on that batch's stream. With ``attempt`` (a worker's
        renders) it is written only while the job runs that attempt under that owner; without
        (benchmarks, tests of the pictures alone, jobs with no record) it is written as is."""
        with self._ready:
            self._pending[job_id] = (pixels, batch_id, ttl, attempt)
            self._ready.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued picture is written (benchmarks); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            with self._ready:
                self._busy = False
                self._ready.notify_all()
                while not self._pending:
                    self._ready.wait()
                job_id, (pixels, batch_id, ttl, attempt) = self._pending.popitem()
                self._busy = True
            try:
                if callable(pixels):
                    pixels = pixels()
                jpeg = encode_jpeg(pixels)
                if attempt is not None:  # written only while that attempt runs
                    self._put(keys=[keys.job(job_id), keys.preview(job_id),
                                    keys.batch_events(batch_id or "_")],
                              args=[attempt.owner, attempt.attempts, repr(attempt.started),
                                    jpeg, ttl, job_id, 1 if batch_id else 0, EVENTS_KEPT])
                else:
                    self.redis.set(keys.preview(job_id), jpeg, ex=ttl)
                    if batch_id:  # after the picture: a reader of the marker finds it
                        self.redis.xadd(keys.batch_events(batch_id),
                                        {"job": job_id, "preview": 1},
                                        maxlen=EVENTS_KEPT, approximate=True)
            except Exception as exc:  # a preview is never worth a job: log and go on
                log.warning("preview of %s not written: %s", job_id, exc)


class Previews:
    """The worker's previews: :meth:`hook` gives the render's ``on_latents`` for a group.
    ``method``: ``linear`` (the family's factors) or ``taesd`` (its tiny VAE from
    ``models_dir``, where its weights are; else linear)."""

    def __init__(self, redis: Redis, every: float, method: str = "linear",
                 models_dir: Path | None = None):
        if method not in METHODS:
            raise ValueError(f"preview method must be one of {', '.join(METHODS)}, "
                             f"got {method!r}")
        self.every = every
        self.method = method
        self.models_dir = models_dir
        self.writer = PreviewWriter(redis) if every > 0 else None
        self._decoders: dict[tuple[str, Path, int], taesd.Decoder] = {}
        self._said: dict[str, str] = {}  # family -> the last thing logged about its TAESD

    def _say(self, family: str, message: str, *args) -> None:
        """Log ``message`` once per family while it stays the same (no line per job)."""
        text = message % args
        if self._said.get(family) != text:
            self._said[family] = text
            (log.warning if "linear" in text else log.info)(text)

    def decoder(self, family) -> taesd.Decoder | None:
        """The TAESD decoder ``family``'s jobs get previews from, or None (linear): the method
        is linear, the family has no TAESD, its weights are missing or failed to load."""
        if self.method != "taesd" or not family.taesd:
            return None
        path = taesd.find(self.models_dir or Path("."), family.taesd)
        if path is None:
            self._say(family.name, "live previews: no %s weights for %s models in %s (%s/ or "
                      "%s_decoder.safetensors): linear previews instead", family.taesd,
                      family.name, Path(self.models_dir or ".") / taesd.FOLDER, family.taesd,
                      family.taesd)
            return None
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return None
        key = (family.taesd, path, stamp)
        decoder = self._decoders.get(key)
        if decoder is None:  # new or replaced weights: forget older versions
            self._decoders = {k: v for k, v in self._decoders.items() if k[0] != family.taesd}
            decoder = self._decoders[key] = taesd.Decoder(family.taesd, path)
        if decoder.failed:
            self._say(family.name, "live previews: %s from %s does not load (%s): linear "
                      "previews instead", family.taesd, path, decoder.failed)
            return None
        self._say(family.name, "live previews of %s models: %s from %s", family.name,
                  family.taesd, path)
        return decoder

    def hook(self, job_ids: Sequence[str], family, width: int, height: int,
             batch_ids: Sequence[str] = (),
             attempts: Sequence[Attempt] = ()) -> OnLatents | None:
        """``on_latents`` for the jobs ``job_ids`` (of batches ``batch_ids``, for the event
        streams; in attempts ``attempts``, see :meth:`PreviewWriter.put`) rendered together at
        ``width`` x ``height`` with a model of ``family``: a preview of each job's first image
        after the first step, then every ``every`` seconds. None when previews are off or the
        family has neither factors nor a TAESD."""
        writer = self.writer
        if writer is None:
            return None
        decoder = self.decoder(family)
        if decoder is None and not family.latent_rgb_factors:
            return None
        size = (taesd.preview_size(width, height) if decoder is not None
                else preview_size(width, height))
        next_at = 0.0  # the first step is due at once

        def on_latents(latents: torch.Tensor, owners: Sequence[int]) -> None:
            nonlocal next_at
            t = time.monotonic()
            if t < next_at:
                return
            rows: dict[int, int] = {}
            for row, owner in enumerate(owners):
                rows.setdefault(owner, row)  # a job's first image in this call
            spacing = self.every
            if decoder is not None:
                spacing = max(spacing, decoder.seconds * len(rows) / TAESD_SHARE)
            next_at = t + spacing
            try:
                picked = unpack(latents, width, height)[list(rows.values())]
                if decoder is not None:  # a copy (indexing copies): decoded in the thread
                    pictures: list = [
                        lambda x=picked[i : i + 1]: decoder.decode(x, size)[0]
                        for i in range(len(rows))]
                else:
                    pictures = list(latents_to_rgb(picked, family.latent_rgb_factors,
                                                   family.latent_rgb_bias, size))
            except Exception as exc:  # never fail a job for its preview
                log.warning("no preview of %s: %s", ", ".join(job_ids), exc)
                next_at = float("inf")
                return
            # Previews spaced TTL or more apart (TAESD's on a CPU) live TTL past the next one's
            # due time, so a running job keeps one between them.
            ttl = TTL if spacing < TTL else TTL + math.ceil(spacing)
            for owner, picture in zip(rows, pictures, strict=True):
                writer.put(job_ids[owner], picture,
                           batch_ids[owner] if owner < len(batch_ids) else "", ttl,
                           attempts[owner] if owner < len(attempts) else None)

        return on_latents

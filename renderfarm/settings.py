"""Every setting of the farm, in one typed place, read from ``RENDERFARM_*`` variables.

The README's settings table documents the same fields; keep the two in step.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The farm's settings. ``Settings()`` reads the environment; tests pass values directly."""

    model_config = SettingsConfigDict(env_prefix="RENDERFARM_", extra="ignore")

    redis_url: str | None = Field(
        None,
        description="Redis of the farm. Unset: the embedded farm's Redis in the data dir.",
    )
    data_dir: Path = Field(
        Path("renderfarm-data"),
        description="Embedded Redis files, local images and models live here.",
    )
    storage_url: str | None = Field(
        None,
        description="file:///abs/dir or s3://bucket/prefix. Unset: <data_dir>/images.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, R2, Ceph)."
    )
    s3_region: str | None = Field(None, description="Region for S3; boto3's default if unset.")
    models_dir: Path | None = Field(None, description="Models live here. Unset: <data_dir>/models.")
    default_model: str = Field("tiny", description="Model used when a job names none.")
    max_attempts: int = Field(
        3, ge=1, description="Deliveries a job gets before it is failed as a poison job."
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="A running job's lease (s), renewed while it runs; expired: job re-queued.",
    )
    resend_after: float = Field(
        30.0, gt=0,
        description="A queued job whose message was not confirmed sent this many seconds after "
        "it went queued (its sender died, or Redis failed in between) is sent again by a worker.",
    )
    store_retry_seconds: float = Field(
        300.0, ge=0,
        description="How long a worker retries storing a job's images while storage fails in a "
        "way that can pass (unreachable, timeouts, 5xx, throttling) before failing the job.",
    )
    task_time_limit: int = Field(3600, ge=1, description="Longest a single job may render (s).")
    visibility_timeout: int = Field(
        7200,
        ge=1,
        description="Redis transport visibility timeout (s); kept above the task time limit.",
    )
    presign_expires: int = Field(3600, ge=1, description="Lifetime of presigned S3 URLs (s).")
    queue: str = Field("renderfarm", description="Prefix of the Celery queues jobs go to.")
    max_batch: int | None = Field(
        None, ge=1, description="Most images per pipeline call (micro-batch); fewer where free "
        "device memory would not hold them at the job's size. Unset: the profile's."
    )
    keep_days: float | None = Field(
        None, gt=0, description="Workers remove the records of batches submitted more than "
        "this many days ago whose every job has ended (as `renderfarm prune`). Unset: kept.",
    )
    compile: bool = Field(
        False, description="torch.compile the UNet on GPU workers, warmed up at worker start "
        "for each warm-up size and batch size (minutes). Other profiles never compile.",
    )
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field("max-autotune", description="torch.compile mode when compiling.")
    warmup_sizes: str = Field(
        "512x512,768x768", pattern=r"^\d+x\d+(,\d+x\d+)*$",
        description="WxH sizes, comma-separated, a compiling worker warms up for at start.",
    )
    preview_seconds: float = Field(
        1.0, ge=0, description="Seconds between live previews of a rendering job (a small JPEG "
        "from its latents, no VAE: GET /api/v1/jobs/<id>/preview, the dashboard's tiles). "
        "0: no previews.",
    )
    preview_method: Literal["linear", "taesd"] = Field(
        "linear", description="How live previews are made. linear: the family's latent-to-RGB "
        "factors (A1111's 'Approx cheap'; at most 64 px a side). taesd: the family's tiny VAE "
        "(taesd, taesdxl, taef1) from <models dir>/vae_approx/ (up to 256 px a side; spaced so "
        "decoding takes at most 2 % of the time); a family whose weights are missing gets "
        "linear previews, said once in the worker's log.",
    )
    max_plot_cells: int = Field(
        100, ge=1, le=10_000, description="Most cells (jobs) one X/Y/Z plot or prompt matrix "
        "may have, all Z values together (renderfarm/plots.py).",
    )

    allowed_hosts: str = Field(
        "", description="Without RENDERFARM_TOKEN the dashboard answers only requests whose Host "
        "is localhost, 127.0.0.1, [::1] or the address it binds (against DNS rebinding); names "
        "listed here (comma-separated) are accepted too.",
    )
    session_lifetime: float = Field(
        12 * 3600, gt=0, description="A dashboard login lasts this many seconds; logging out "
        "ends it at once, for every copy of its cookie.",
    )
    rate_limit_address: str = Field(
        "1200 per minute", description="Requests one client address may make to the API "
        "(/api/v1, /sdapi/v1), as 'N per second|minute|hour', several separated by ';'. "
        "Empty: unlimited.",
    )
    rate_limit_token: str = Field(
        "6000 per minute", description="Requests all clients with one bearer token (or one "
        "login session) may make to the API together. Empty: unlimited.",
    )
    redis_check: Literal["warn", "refuse"] = Field(
        "warn", description="Workers and the dashboard check their Redis: no AOF/RDB persistence "
        "(a restart loses every queued job), an eviction policy other than noeviction, or no "
        "password on a non-loopback address. warn: a loud warning in the log, the dashboard and "
        "`renderfarm status`; refuse: workers and the dashboard do not start.",
    )

    task_events: bool = Field(
        True, description="Workers send Celery task events (Flower, `celery events`, each "
        "job's final task state); 0 turns them off.",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="A worker serves its own Prometheus /metrics on this "
        "port (all addresses; one port per worker process). Unset: not served. The fleet's "
        "metrics are the dashboard's /metrics.",
    )

    dashboard_url: str | None = Field(
        None, description="The dashboard's URL (http://host:port). `renderfarm submit --wait` "
        "then follows the batch's event stream (Server-Sent Events) instead of polling Redis; "
        "unreachable, it polls.",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Key that signs webhooks (Standard Webhooks: 'whsec_' + base64 of "
        "24-64 random bytes). Needed by the processes that deliver them (workers, `renderfarm "
        "webhooks`); a deliverer without it sends nothing and leaves deliveries waiting. To "
        "rotate, give the new key and the old one separated by a space: every delivery then "
        "carries a signature by each, so receivers verify with either while they change over.",
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook targets that resolve to loopback, private, link-local, "
        "multicast or unspecified addresses (refused by default, at submit and at each attempt: "
        "SSRF). For receivers on your own network.",
    )
    webhook_retry_schedule: str = Field(
        "5,300,1800,7200,18000,36000,36000", pattern=r"^\s*\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?)*\s*$",
        description="Seconds to wait after each failed webhook attempt before the next "
        "(comma-separated; Standard Webhooks/Svix's schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, "
        "10 h). After the last, the delivery is given up as failed.",
    )
    webhook_timeout: float = Field(
        5.0, gt=0, le=60, description="Seconds one webhook attempt may take to connect and to "
        "get its answer. Redirects are not followed (a 3xx is a failed attempt).",
    )
    webhook_senders: int = Field(
        4, ge=1, le=64, description="Webhook deliveries one process (each worker, `renderfarm "
        "webhooks`) sends at once, one thread each: a receiver that answers slowly holds one of "
        "them, the others go on delivering to everyone else.",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        import base64
        import binascii

        keys = value.get_secret_value().split()
        if not keys or len(keys) > 4:
            raise ValueError("must be one to four 'whsec_' keys separated by spaces (the first "
                             "signs, all sign while rotating)")
        for n, raw in enumerate(keys, 1):
            which = f"key {n} " if len(keys) > 1 else ""
            if not raw.startswith("whsec_"):
                raise ValueError(f"{which}must be 'whsec_' followed by base64 (Standard "
                                 "Webhooks' form)")
            try:
                key = base64.b64decode(raw[len("whsec_"):], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{which}must be 'whsec_' followed by valid base64") from None
            if len(key) < 16:
                raise ValueError(f"{which}must hold at least 16 bytes of key after 'whsec_'")
        return value

    @property
    def webhook_delays(self) -> tuple[float, ...]:
        return tuple(float(n) for n in self.webhook_retry_schedule.split(","))

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_of_8(cls, value: str) -> str:
        for size in value.split(","):
            width, height = (int(n) for n in size.split("x"))
            if width < 8 or height < 8 or width % 8 or height % 8:
                raise ValueError(f"each size must be a multiple of 8 in both sides, got {size!r}")
        return value

    @property
    def warmup_size_list(self) -> tuple[tuple[int, int], ...]:
        sizes = (size.split("x") for size in self.warmup_sizes.split(","))
        return tuple((int(width), int(height)) for width, height in sizes)

    @cached_property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def models_path(self) -> Path:
        return (self.models_dir or self.data_path / "models").expanduser().resolve()

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_path / "images").as_uri()

    @property
    def farm_file(self) -> Path:
        """Where the embedded farm writes its Redis URL for other processes to find."""
        return self.data_path / "farm.json"

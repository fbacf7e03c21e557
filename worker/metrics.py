"""A worker's own Prometheus metrics, served on ``RENDERFARM_METRICS_PORT`` (unset: none).

Fleet-wide numbers (queued jobs, workers) are the dashboard's ``/metrics``; these are what only
the process that renders knows. ``size`` is ``WxH``; ``outcome`` is the job's end state
(succeeded, failed, cancelled). Render seconds are the denoising and decoding of one pipeline
call (a micro-batch counts once), without the model load, which has its own histogram.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
_STEP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

JOBS = Counter("renderfarm_worker_jobs", "Jobs this worker ended, by model and outcome",
               ["model", "outcome"])
IMAGES = Counter("renderfarm_worker_images", "Images of the jobs this worker ended, by model "
                 "and outcome", ["model", "outcome"])
RENDER_SECONDS = Histogram("renderfarm_worker_render_seconds", "Seconds of one pipeline call",
                           ["model", "size"], buckets=_SECONDS)
STEP_SECONDS = Histogram("renderfarm_worker_step_seconds", "Seconds per denoising step of a "
                         "pipeline call", ["model", "size"], buckets=_STEP_SECONDS)
MODEL_LOAD_SECONDS = Histogram("renderfarm_worker_model_load_seconds", "Seconds to load a model "
                               "from disk", ["model"], buckets=_SECONDS)
LORA_LOAD_SECONDS = Histogram("renderfarm_worker_lora_load_seconds", "Seconds to read and "
                              "activate the LoRAs of a job, when any file was read", ["model"],
                              buckets=_SECONDS)
OOM_RETRIES = Counter("renderfarm_worker_oom_retries", "Jobs retried with memory savers after "
                      "running out of device memory", ["model"])
UPLOAD_SECONDS = Histogram("renderfarm_worker_upload_seconds", "Seconds to encode and store a "
                           "job's images and sidecar", ["model"], buckets=_SECONDS)
QUEUE_WAIT_SECONDS = Histogram("renderfarm_worker_queue_wait_seconds", "Seconds a job waited "
                               "queued before this worker took it", ["model"],
                               buckets=(*_SECONDS, 1800, 3600, 7200))


def serve(port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 (a probe/scrape port)
    """Serve ``/metrics`` of this process on ``address:port`` (a daemon thread)."""
    start_http_server(port, addr=address)

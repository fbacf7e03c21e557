"""Out of memory, for real, for every model family: a worker process under a data-size limit
runs out of memory, and the limit is measured on that worker, not tuned by hand.

Issue 4: "A job that runs out of device memory is retried once with the memory savers on
before it fails"; issue 10: the OOM retry works for SDXL and Flux as for SD 1.5. There is no
GPU here, so the device is the CPU and its memory is capped for one real worker process with
``RLIMIT_DATA`` (``resource.prlimit`` on its pid). Over the limit, malloc fails and torch's CPU
allocator raises ``RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to
allocate N bytes`` in the worker: nothing in torch or diffusers is mocked. (``RLIMIT_DATA``
counts private writable memory; unlike ``RLIMIT_AS`` it leaves out the libraries' code and
address space only reserved, and unlike a cgroup limit it makes allocations fail instead of
having the kernel kill the process.)

The limit comes from the worker itself, per model: uncapped, the test renders one image and
then ``N`` images at once (one pipeline call: the VAE decodes them together) and reads the
worker's peak resident memory over each job (``VmHWM``, reset through ``/proc/<pid>/clear_refs``
before it). The cap is the worker's data size plus one image's peak and a third of the gap to
``N`` images' (one image's peak is what the savers need, VAE slicing decoding one image at a
time, give or take a few MiB; the rest of the gap is kept below ``N`` images' need): ``N``
images at once do not fit, one image does, and so does each of the memory savers' steps. The
worker runs with glibc's mmap threshold fixed at 64 KiB, so every tensor is a mapping of its
own, returned to the kernel when freed: what a job needs above the data size is its peak, not
whatever the allocator happened to keep from earlier jobs. The VAE tiles only images over
1024 px (its config's ``sample_size``), so a single big image cannot be saved by tiling: it
needs ~16 small images' memory and fails even with the savers.

For each family (one worker, one model after the other, uncapped in between):

* ``N`` one-image jobs micro-batched into one call: the call runs out, the batch is split and
  each job renders alone (the smaller retry), equal to the uncapped ``N``-image render of the
  same seeds;
* one job of ``N`` images: runs out, is retried once with the memory savers and succeeds, with
  the same images;
* one big image: runs out with the savers too and fails "out of device memory: ...";
* the worker lives on under the same limit and renders a small job.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer import FarmClient
from renderfarm.embedded import EmbeddedRedis
from renderfarm.farm import EmbeddedFarm
from renderfarm.schema import JobState
from renderfarm.settings import Settings

resource = pytest.importorskip("resource")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(resource, "prlimit"),
    reason="needs Linux's prlimit(2) and /proc to cap a worker process's memory (RLIMIT_DATA)",
)

MODELS = ("tiny", "tiny-sdxl", "tiny-flux")
N = 4  #: images of one pipeline call (the CPU profile's max_batch)
SIZE = 192  #: a multiple of 16 (Flux); ~25 MiB of VAE decode per image on the tiny VAE
BIG = 4 * SIZE  #: one image of 16 small images' pixels
STEPS = 1  #: the denoiser's memory is small beside the VAE decode's at these sizes
SEED = 1234
SAVERS_LOG = "ran out of device memory; retrying with memory savers"
SPLIT_LOG = "ran out of device memory; rendering them one by one"


@pytest.fixture(scope="module")
def oom_models(tmp_path_factory) -> Path:
    """The tiny model of each family, with VAE tiles of 1024 px (their configs' ``sample_size``
    is 32: a 192 px image would be decoded in overlapping 32 px tiles, slowly)."""
    from worker.modelgen import make_model

    root = tmp_path_factory.mktemp("oom-models")
    for kind in MODELS:
        make_model(kind, root / kind)
        config_path = root / kind / "vae" / "config.json"
        config = json.loads(config_path.read_text())
        config["sample_size"] = 1024
        config_path.write_text(json.dumps(config, indent=2))
    return root


@pytest.fixture(scope="module")
def oom_farm(oom_models, tmp_path_factory):
    """A farm on its own redis-server and local storage, with one worker (uncapped) that has
    the three models."""
    tmp = tmp_path_factory.mktemp("oom-farm")
    server = EmbeddedRedis(tmp / "redis")
    url = server.start()
    settings = Settings(redis_url=url, data_dir=tmp / "farm", models_dir=oom_models)
    farm = EmbeddedFarm(settings, workers=0, profile="cpu").start()
    try:
        # One thread: under a loaded CPU two OpenMP threads are many times slower, and the
        # limit is measured on this process, whatever its threads' scratch memory.
        proc = farm.start_worker(env={"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
                                      "MALLOC_MMAP_THRESHOLD_": "65536"})
        farm.wait_for_workers(1, timeout=90)
        yield farm, proc
    finally:
        farm.stop(timeout=15)
        server.stop()


def _status(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in bytes: ``VmData`` (private writable memory: what
    RLIMIT_DATA caps), ``VmHWM`` (peak resident memory since the last reset)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


def _reset_peak(pid: int) -> int:
    """Reset the process's peak resident memory to its current one; return that."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the worker's peak memory (clear_refs): {exc}")
    return _status(pid, "VmRSS")


def _cap(pid: int, limit: int) -> None:
    try:
        resource.prlimit(pid, resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    except (OSError, ValueError) as exc:  # not ours to limit here (no permission, a sandbox)
        pytest.skip(f"cannot set RLIMIT_DATA on the worker process: {exc}")
    if resource.prlimit(pid, resource.RLIMIT_DATA)[0] != limit:
        pytest.skip("RLIMIT_DATA did not take on the worker process")


@pytest.mark.parametrize("model", MODELS)
def test_out_of_memory_is_retried_smaller_then_fails_and_the_worker_lives_on(oom_farm, model):
    farm, proc = oom_farm
    client = FarmClient(farm.settings)
    log_path = farm.log_dir / "worker-0.log"
    job = {"model": model, "width": SIZE, "height": SIZE, "steps": STEPS, "prompt": "memory"}

    def run(jobs: list[dict]) -> list:
        batch = client.submit_batch(jobs)
        batch.wait(timeout=180)
        return [client.records.job(job_id) for job_id in batch.job_ids]

    def succeeded(jobs: list[dict]) -> list:
        records = run(jobs)
        assert [r.state for r in records] == [JobState.succeeded] * len(jobs), (
            [r.error for r in records], log_path.read_text()[-3000:])
        return records

    def pixels(records) -> list[np.ndarray]:
        return [np.asarray(Image.open(io.BytesIO(client.storage.get(result.key))), np.int16)
                for record in records for result in record.results]

    def peak(jobs: list[dict]) -> tuple[int, list]:
        """Bytes over its resident memory before it that the worker took at most for jobs."""
        before = _reset_peak(proc.pid)
        records = succeeded(jobs)
        return _status(proc.pid, "VmHWM") - before, records

    _cap(proc.pid, resource.RLIM_INFINITY)  # the model before may have left it capped
    # The reference: N images in one call, uncapped (this also loads the model and lets the
    # allocator settle at this size).
    reference = pixels(succeeded([{**job, "seed": SEED, "num_images": N}]))
    one, _ = peak([{**job, "seed": SEED}])
    many, records = peak([{**job, "seed": SEED, "num_images": N}])
    assert max(np.abs(a - b).max() for a, b in zip(pixels(records), reference, strict=True)) <= 2
    measured = f"{N} images took {many >> 20} MiB, one {one >> 20} MiB"
    assert many > 2 * one, measured
    _cap(proc.pid, _status(proc.pid, "VmData") + one + (many - one) // 3)
    logged = len(log_path.read_text())

    # N one-image jobs, micro-batched: the call runs out; each job alone fits, no savers.
    split = succeeded([{**job, "seed": SEED + k} for k in range(N)])
    log = log_path.read_text()[logged:]
    batches = re.findall(rf"batch of {N} \(jobs ([\w ]+)\) {SPLIT_LOG}", log)
    about = [line for line in log.splitlines()
             if "batch of" in line or any(r.id in line for r in split)]
    assert [set(ids.split()) for ids in batches] == [{r.id for r in split}], (measured, about)
    assert SAVERS_LOG not in log, log
    assert [r.attempts for r in split] == [1] * N
    assert max(np.abs(a - b).max() for a, b in zip(pixels(split), reference, strict=True)) <= 2

    # One job of N images: runs out, retried once with the memory savers, succeeds.
    logged += len(log)
    [whole] = succeeded([{**job, "seed": SEED, "num_images": N}])
    log = log_path.read_text()[logged:]
    assert log.count(SAVERS_LOG) == 1 and f"job {whole.id} {SAVERS_LOG}" in log, (measured, log)
    assert max(np.abs(a - b).max() for a, b in zip(pixels([whole]), reference, strict=True)) <= 2

    # One big image: too big with the savers too: retried once, then failed.
    logged += len(log)
    [big] = run([{**job, "seed": SEED, "width": BIG, "height": BIG}])
    log = log_path.read_text()[logged:]
    assert big.state is JobState.failed, (big.state, log)
    assert big.error.startswith("out of device memory: "), big.error
    assert "can't allocate memory" in big.error
    assert log.count(SAVERS_LOG) == 1 and f"job {big.id} {SAVERS_LOG}" in log, log

    # The worker lives on, under the same limit, and renders a small job.
    assert proc.poll() is None
    succeeded([{**job, "seed": SEED, "width": 64, "height": 64}])
    assert proc.poll() is None

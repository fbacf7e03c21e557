"""The ``renderfarm`` command. Heavy imports (torch, diffusers, Celery's worker) happen only in
the sub-commands that need them, so ``renderfarm submit`` starts fast on a laptop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from renderfarm.settings import Settings


def _settings() -> Settings:
    return Settings()


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class _FarmGroup(click.Group):
    """Every command: a farm that cannot be reached is one line on stderr (exit 2), never a
    traceback."""

    def invoke(self, ctx: click.Context):
        from redis.exceptions import ConnectionError as RedisDown

        from renderfarm.errors import FarmUnavailable

        try:
            return super().invoke(ctx)
        except FarmUnavailable as exc:
            _fail(str(exc))
        except RedisDown as exc:
            _fail(f"the farm's Redis is unreachable: {exc}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@click.group(cls=_FarmGroup)
@click.version_option(package_name="renderfarm")
def main() -> None:
    """A render farm for Stable Diffusion: Redis + Celery workers running diffusers."""


# -- submitting ---------------------------------------------------------------------------
@main.command()
@click.argument("prompts", nargs=-1)
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompts, one a line (.txt), or jobs, one JSON object a line (.jsonl).")
@click.option("--count", default=1, show_default=True, type=int,
              help="Images of each prompt, as separate jobs with seeds seed, seed+1, ...")
@click.option("--steps", type=int)
@click.option("--size", help="WIDTHxHEIGHT, e.g. 512x512.")
@click.option("--seed", type=int, help="Seed of the first image; random if not given.")
@click.option("--model", help="Model name (default: RENDERFARM_DEFAULT_MODEL).")
@click.option("--negative", "negative_prompt", help="Negative prompt.")
@click.option("--scheduler")
@click.option("--cfg", "guidance_scale", type=float, help="Guidance scale (CFG).")
@click.option("--priority", type=int, help="0-9; higher runs first.")
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="img2img: the init image.")
@click.option("--strength", type=float, help="img2img strength, 0-1.")
@click.option("--hardware", help="any, gpu, cpu, jetson or mps.")
@click.option("--label", default="",
              help="A name for the batch, shown by `status` and in the dashboard's list.")
@click.option("--x", "x_axis", metavar="FIELD=V1,V2,...",
              help="X/Y/Z plot: the X axis (seed=1,2,3; prompt=S/R:barn,house; size=512x512,"
              "512x768; lora:NAME=0,0.5,1). Values are comma-separated (CSV quotes allowed).")
@click.option("--y", "y_axis", metavar="FIELD=V1,V2,...", help="X/Y/Z plot: the Y axis.")
@click.option("--z", "z_axis", metavar="FIELD=V1,V2,...",
              help="X/Y/Z plot: the Z axis (one grid per value).")
@click.option("--prompt-matrix", is_flag=True,
              help="The prompt is a matrix, a|b|c: every combination of the parts after the "
              "first (2^n jobs), as the X axis (or the first free axis).")
@click.option("--wait/--no-wait", default=False, help="Show progress until the batch ends.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.option("--webhook-url", help="POST each job's end and the batch's completion here, "
              "signed (Standard Webhooks).")
def submit(prompts, file, count, size, init_image, wait, timeout, seed, label, webhook_url,
           x_axis, y_axis, z_axis, prompt_matrix, **options) -> None:
    """Submit prompts as a batch of jobs, or one prompt as an X/Y/Z plot (--x/--y/--z)."""
    from renderfarm.images import encode_init_image
    from renderfarm.jobfile import read_jobs

    base = {k: v for k, v in options.items() if v is not None}
    if size:
        try:
            w, h = (int(x) for x in size.lower().split("x"))
        except ValueError:
            _fail(f"--size must look like 512x512, got {size!r}")
        base.update(width=w, height=h)
    if init_image:
        base.update(mode="img2img", init_image=encode_init_image(init_image.read_bytes()))
    # each job with where it came from, for error messages: "prompt 2", "jobs.jsonl line 3"
    jobs = [(f"prompt {n}", {**base, "prompt": p}) for n, p in enumerate(prompts, 1)]
    if file:
        try:
            jobs += [(f"{file.name} line {n}", {**base, **j}) for n, j in read_jobs(file)]
        except ValueError as exc:
            _fail(str(exc))
    if not jobs:
        _fail("give at least one prompt, or --file")
    axes = {name: text for name, text in (("x", x_axis), ("y", y_axis), ("z", z_axis)) if text}
    if axes or prompt_matrix:
        if len(jobs) != 1 or file or count != 1:
            _fail("a plot (--x/--y/--z, --prompt-matrix) takes one prompt, without --file or "
                  "--count")
        job = {**jobs[0][1], **({"seed": seed} if seed is not None else {})}
        _submit_plot(job, axes, prompt_matrix, wait, timeout, label, webhook_url)
        return
    if count < 1:
        _fail(f"--count must be at least 1, got {count}")
    expanded, origin = [], []
    for where, job in jobs:
        first = job.get("seed", seed)
        for k in range(count):
            try:
                extra = {"seed": int(first) + k} if first is not None else {}
            except (TypeError, ValueError):
                extra = {}  # a bad seed: validation names it below
            expanded.append({**job, **extra})
            origin.append(where)
    from producer import FarmClient

    client = FarmClient(_settings())
    batch = _submitted(lambda: client.submit_batch(expanded, label=label,
                                                   webhook_url=webhook_url), origin)
    click.echo(f"batch {batch.id}: {_plural(len(expanded), 'job')} queued")
    if wait:
        from renderfarm.progress import follow_batch

        ok = follow_batch(client, batch.id, timeout=timeout)
        sys.exit(0 if ok else 1)


def _submitted(submit, origin: list[str] | None = None):
    """``submit()``'s batch; a refused job prints one ``error:`` line per field (with where the
    job came from, ``origin[index]``, when given) and exits 2; no farm: one line (exit 2)."""
    from renderfarm.errors import FarmUnavailable, InvalidJob

    try:
        return submit()
    except InvalidJob as exc:
        for err in exc.errors:
            where = ""
            if origin is not None and err.index is not None:
                where = f"{origin[err.index]}: "
                err.index = None
            click.echo(f"error: {where}{err}", err=True)
        sys.exit(2)
    except FarmUnavailable as exc:
        _fail(str(exc))


def _submit_plot(job: dict, texts: dict[str, str], prompt_matrix: bool, wait: bool,
                 timeout: float | None, label: str = "",
                 webhook_url: str | None = None) -> None:
    from producer import FarmClient
    from renderfarm.errors import InvalidJob
    from renderfarm.plots import AXES, parse_cli_axis

    try:
        axes = {name: parse_cli_axis(text) for name, text in texts.items()}
    except InvalidJob as exc:
        _fail(str(exc))
    if prompt_matrix:
        free = next((name for name in AXES if name not in axes), None)
        if free is None:
            _fail("--prompt-matrix needs a free axis: --x, --y and --z are all taken")
        axes[free] = {"field": "prompt_matrix", "values": []}
    client = FarmClient(_settings())
    batch = _submitted(lambda: client.submit_plot(job, dict(sorted(axes.items())), label=label,
                                                  webhook_url=webhook_url))
    click.echo(f"plot {batch.id}: {_plural(len(batch.job_ids or []), 'job')} queued")
    if wait:
        from renderfarm.progress import follow_batch

        ok = follow_batch(client, batch.id, timeout=timeout)
        finished = client.records.batch(batch.id).finished
        grids = _wait_for_grids(client, batch.id, timeout=60.0) if finished else []
        for grid in grids:
            click.echo(f"grid: {client.storage.url(grid['key'])}")
        if not grids:
            click.echo("grid: not drawn yet (a worker draws it once every cell has ended)")
        sys.exit(0 if ok and grids else 1)


def _wait_for_grids(client, batch_id: str, timeout: float) -> list[dict]:
    """The plot's grids, waiting up to ``timeout`` s for a worker to draw them."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        grids = client.records.batch(batch_id).grids
        if grids or time.monotonic() > deadline:
            return grids
        time.sleep(0.2)


@main.command()
def webhooks() -> None:
    """Deliver due webhooks until stopped (Ctrl-C). Workers deliver them too; run this for a
    deliverer of its own (needs RENDERFARM_WEBHOOK_SECRET)."""
    import logging
    import signal
    import threading

    from producer import FarmClient
    from renderfarm.webhooks import start_sender

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = _settings()
    if settings.webhook_secret is None:
        _fail("RENDERFARM_WEBHOOK_SECRET is not set: webhooks cannot be signed")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo("delivering webhooks (Ctrl-C stops)", err=True)
    threads = start_sender(settings, FarmClient(settings), stop)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        stop.set()
    for thread in threads:
        thread.join(2 * settings.webhook_timeout + 5)


@main.command()
@click.argument("ident", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def status(ident: str | None, as_json: bool) -> None:
    """Print a batch or a job; with no IDENT, the farm: its Redis and its workers."""
    from producer import FarmClient
    from renderfarm.errors import FarmUnavailable, JobNotFound
    from renderfarm.progress import print_batch, print_job

    client = FarmClient(_settings())
    try:
        if ident is None:
            _print_farm(client)
        elif client.records.exists(ident):
            record = client.records.job(ident)
            if as_json:
                click.echo(record.model_dump_json(indent=2, exclude={"request": {"init_image"}}))
            else:
                print_job(client, record)
        else:
            batch = client.records.batch(ident)
            if as_json:
                click.echo(batch.model_dump_json(indent=2))
            else:
                print_batch(client, batch)
                if batch.plot is not None:  # an X/Y/Z plot: where its grids are
                    for grid in batch.grids:
                        click.echo(f"grid: {client.storage.url(grid['key'])}")
                    if batch.grid_state == "redrawing":
                        click.echo("grid: being drawn again (a cell was retried; a worker "
                                   "draws it once every cell has ended)")
                    elif not batch.grids:
                        click.echo("grid: not drawn yet (a worker draws it once every cell "
                                   "has ended)")
    except JobNotFound as exc:
        _fail(str(exc))
    except FarmUnavailable as exc:
        _fail(str(exc))


def _print_farm(client) -> None:
    from renderfarm.connection import redis_url
    from renderfarm.fleet import live_workers
    from renderfarm.redis_check import inspect

    report = inspect(client.redis, redis_url(client.settings))
    click.echo(report.summary)
    for problem in report.problems:
        click.echo(f"UNSAFE REDIS: {problem}")
    if "unknown" in (report.persistence, report.eviction):
        click.echo("(unknown: CONFIG is not allowed on this Redis; check it persists and never "
                   "evicts)")
    workers = live_workers(client.redis)
    click.echo(f"{len(workers)} live worker(s)")


@main.command()
@click.argument("ident")
@click.option("--json", "as_json", is_flag=True, help="Print job id -> outcome as JSON.")
def cancel(ident: str, as_json: bool) -> None:
    """Cancel a job, or every unfinished job of a batch."""
    from producer import FarmClient
    from renderfarm.errors import JobNotFound

    client = FarmClient(_settings())
    try:
        if client.records.exists(ident):
            outcomes = {ident: client.job(ident).cancel()}
        else:
            client.records.batch(ident)
            outcomes = client.batch(ident).cancel()
    except JobNotFound as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(outcomes, indent=2))
        return
    if not outcomes:
        click.echo(f"batch {ident}: every job had already ended; nothing to cancel")
    for job_id, outcome in outcomes.items():
        click.echo(f"{job_id}: {CANCEL_OUTCOMES.get(outcome, outcome)}")


@main.command()
@click.argument("batch_id")
def pause(batch_id: str) -> None:
    """Pause a batch: its queued jobs stay queued and no worker takes them until
    'renderfarm resume'; running ones finish. Survives worker restarts."""
    from producer import FarmClient
    from renderfarm.errors import JobNotFound

    try:
        held = FarmClient(_settings()).pause(batch_id)
    except JobNotFound as exc:
        _fail(str(exc))
    click.echo(f"batch {batch_id}: paused, {held} queued job(s) held")


@main.command()
@click.argument("batch_id")
def resume(batch_id: str) -> None:
    """Resume a paused batch: its queued jobs go back in line (taking turns with the other
    batches, not ahead of them)."""
    from producer import FarmClient
    from renderfarm.errors import JobNotFound

    try:
        ids = FarmClient(_settings()).resume(batch_id)
    except JobNotFound as exc:
        _fail(str(exc))
    click.echo(f"batch {batch_id}: resumed, {len(ids)} queued job(s) back in line")


#: What ``Records.cancel``'s answers mean to a user.
CANCEL_OUTCOMES = {
    "cancelled": "cancelled",
    "cancelling": "cancelling (it is running: it stops at its next step)",
    "storing": "too late to cancel: its images are being stored, it will succeed",
    "succeeded": "already succeeded",
    "failed": "already failed",
}


@main.group()
def health() -> None:
    """Exit 0 when healthy, 1 when not: for a container HEALTHCHECK or a Kubernetes probe."""


@health.command("worker")
@click.option("--host", help="Whose workers (default: this host's name, i.e. the container).")
@click.option("--starting-ok", is_flag=True,
              help="A worker still loading or warming up its models passes too.")
def health_worker(host: str | None, starting_ok: bool) -> None:
    """A worker of this host beats in Redis, fresh, and is ready."""
    from renderfarm.health import worker_health

    ok, why = worker_health(_settings(), host, starting_ok)
    click.echo(why)
    sys.exit(0 if ok else 1)


@health.command("dashboard")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True,
              help="The dashboard's base URL.")
def health_dashboard(url: str) -> None:
    """The dashboard answers GET /healthz with 200 (it reaches its Redis)."""
    from renderfarm.health import dashboard_health

    ok, why = dashboard_health(url)
    click.echo(why)
    sys.exit(0 if ok else 1)


class Age(click.ParamType):
    """A duration: a number with s, m, h or d (``30d``, ``12h``); seconds out."""

    name = "age"
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        try:
            amount = float(text[:-1])
        except ValueError:
            amount = -1.0
        if text[-1:] not in self.units or amount < 0:
            self.fail(f"must be a number with s, m, h or d, like 30d or 12h, got {value!r}",
                      param, ctx)
        return amount * self.units[text[-1]]


@main.command()
@click.option("--older-than", required=True, type=Age(),
              help="Age of the batches to remove, counted from submit: 30d, 12h, 90m, 600s.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
def prune(older_than: float, dry_run: bool) -> None:
    """Remove the records of old batches whose every job has ended, so Redis does not grow
    forever. Images in storage stay; batches with a job still queued or running stay."""
    from redis.exceptions import ConnectionError as RedisDown

    from producer import FarmClient
    from renderfarm.errors import FarmUnavailable

    try:
        done = FarmClient(_settings()).records.prune(older_than, dry_run=dry_run)
    except (FarmUnavailable, RedisDown) as exc:
        _fail(f"the farm's Redis is unreachable: {exc}")
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {done.batches} batches ({done.jobs} jobs); "
               f"kept {done.kept_running} old batches with jobs not ended")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models(as_json: bool) -> None:
    """List the models the farm knows: family (sd15, sdxl, flux; "?" where no worker has said
    and it cannot be read here), A1111's model hash, the SHA-256 ("-" until a worker has
    hashed the model), the live workers that have it and the LoRAs of its family; then each
    LoRA with its family and the live workers that have it."""
    from rich.console import Console
    from rich.table import Table

    from producer import FarmClient

    farm = FarmClient(_settings())
    inventory = farm.inventory()
    models, loras = inventory["models"], inventory["loras"]
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    if not models:
        click.echo(f"no models: put one in {farm.settings.models_path} "
                   "(renderfarm make-model tiny DIR makes a test model)")
        return
    table = Table("model", "family", "hash", "sha256", "workers", "LoRAs")
    table.columns[0].no_wrap = True
    table.columns[3].overflow = "fold"
    for name, info in models.items():
        table.add_row(name, info["family"] or "?", info["model_hash"] or "-",
                      info["sha256"] or "-", "\n".join(info["worker_ids"]) or "none live",
                      "\n".join(info["loras"]) or "-")
    console = Console()
    console.print(table)
    if loras:
        table = Table("LoRA", "family", "workers")
        table.columns[0].no_wrap = True
        for name, info in loras.items():
            table.add_row(name, info["family"] or "?", "\n".join(info["worker_ids"]) or "none live")
        console.print(table)
    else:
        console.print(f"no LoRAs: put .safetensors files in {farm.settings.models_path / 'loras'}")


# -- running the farm -----------------------------------------------------------------------
@main.command()
@click.option("--profile", default="auto", show_default=True,
              type=click.Choice(["auto", "gpu", "cpu", "jetson", "mps"]))
@click.option("--queues", help="Comma-separated queues to consume (default: the farm's queue).")
@click.option("--preload", multiple=True, help="Load this model before taking jobs.")
@click.option("--name", help="Worker name (default: from host and pid).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--max-models", default=2, show_default=True, type=int,
              help="Models kept loaded at once (an LRU); 1 where device memory is tight.")
@click.option("--affinity/--no-affinity", default=True, show_default=True,
              help="Keep taking jobs of loaded models before the next message (FIFO when off).")
@click.option("--gpus", help="'all' or indices like 0,1: one worker process per GPU.")
def worker(profile, queues, preload, name, loglevel, max_models, affinity, gpus) -> None:
    """Start a worker: one process, one device, solo pool."""
    from renderfarm.errors import FarmUnavailable

    if gpus:
        from worker.gpus import gpu_ids, run_per_gpu

        args = ["--profile", "gpu" if profile == "auto" else profile, "--loglevel", loglevel,
                "--max-models", str(max_models), "--affinity" if affinity else "--no-affinity"]
        args += [a for m in preload for a in ("--preload", m)]
        args += ["--queues", queues] if queues else []
        try:
            sys.exit(run_per_gpu(gpu_ids(gpus), args))
        except (ValueError, RuntimeError) as exc:
            _fail(str(exc))
    from worker.main import run_worker

    try:
        run_worker(_settings(), profile=profile, queues=queues.split(",") if queues else None,
                   preload=list(preload), loglevel=loglevel, name=name, max_models=max_models,
                   affinity=affinity)
    except FarmUnavailable as exc:
        _fail(str(exc))
    # Celery has shut down: every rendered job is stored (the worker_shutdown drain) and every
    # lease released. Skip the interpreter's teardown: collecting the loaded pipelines' objects
    # at exit took 2-5 s on 2 cores, which `renderfarm up`, a restart and the tests wait for.
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1; a non-loopback "
              "address needs RENDERFARM_TOKEN, or --insecure-no-auth).")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--insecure-no-auth", is_flag=True, help="Serve a non-loopback address without "
              "RENDERFARM_TOKEN: anyone who reaches it may submit and cancel jobs.")
def dashboard(host: str | None, port: int, insecure_no_auth: bool) -> None:
    """Serve the dashboard and its JSON API with waitress."""
    import logging

    from dashboard.serve import serve

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(_settings(), host=host, port=port, insecure_no_auth=insecure_no_auth)
    except RuntimeError as exc:
        _fail(str(exc))


@main.command()
@click.option("--workers", default=1, show_default=True, type=int, help="Worker processes.")
@click.option("--profile", default="auto", show_default=True)
@click.option("--dashboard/--no-dashboard", "with_dashboard", default=True, show_default=True)
@click.option("--port", default=8080, show_default=True, type=int, help="Dashboard port.")
@click.option("--stop-timeout", default=300.0, show_default=True, type=float,
              help="On Ctrl-C, seconds running jobs get to finish before they go back to the "
              "queue.")
def up(workers: int, profile: str, with_dashboard: bool, port: int,
       stop_timeout: float) -> None:
    """Start the embedded farm (Redis, workers, dashboard) and keep it running until Ctrl-C.

    Ctrl-C stops it in order: the workers take no new job and finish (and store) the running
    ones, then the dashboard and Redis stop. A second Ctrl-C stops the running jobs at their
    next step and puts them back in the queue at once; the next ``up`` runs them."""
    import signal
    import threading

    from renderfarm.farm import EmbeddedFarm

    settings = _settings()
    farm = EmbeddedFarm(settings, workers=workers, profile=profile)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        if not stop.is_set():
            stop.set()
        elif not hurry.is_set():
            hurry.set()
            click.echo("second Ctrl-C: running jobs stop now and go back to the queue...")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server = None
    click.echo(f"starting Redis and {workers} worker(s); a worker is ready once its models are "
               "loaded (and compiled, with RENDERFARM_COMPILE=1: minutes)...")
    click.echo(f"logs: {farm.log_dir}/worker-N.log")
    try:
        farm.start()
    except (RuntimeError, TimeoutError) as exc:
        farm.stop()
        _fail(str(exc))
    try:
        click.echo(f"farm up: Redis {_redact(farm.redis_url)}, {workers} worker(s), "
                   f"data in {settings.data_path}")
        if with_dashboard:
            from dashboard import create_app
            from dashboard.serve import make_server

            app = create_app({"SETTINGS": farm.settings})
            server = make_server(app, port=port)
            threading.Thread(target=server.run, name="dashboard", daemon=True).start()
            auth = "token required" if app.config["TOKEN"] else "no auth"
            click.echo(f"dashboard: http://127.0.0.1:{server.effective_port}/ "
                       f"(localhost only, {auth})")
        click.echo("submit from another terminal with the same RENDERFARM_DATA_DIR, e.g.:")
        click.echo('  renderfarm submit "a lighthouse at dawn" --count 4 --wait')
        click.echo("Ctrl-C stops the farm (running jobs finish first; Ctrl-C twice: they go "
                   "back to the queue).")
        _report_finished_jobs(farm, stop)
        click.echo(f"stopping: no new jobs; running jobs finish and are stored (up to "
                   f"{stop_timeout:g} s; Ctrl-C again to put them back in the queue now)...")
        killed = farm.stop_workers(timeout=stop_timeout, hurry=hurry)
        if killed:
            click.echo(f"killed worker(s) {killed}: they did not stop in time")
        click.echo("workers stopped")
    finally:
        farm.stop_workers(timeout=0, grace=5)  # an error above: never leave a worker behind
        if server is not None:
            server.close()
            click.echo("dashboard stopped")
        farm.stop_redis()
    click.echo("farm stopped")


def _report_finished_jobs(farm, stop) -> None:
    """Until ``stop`` is set: one line per job that ends (succeeded, failed, cancelled), from
    the records of jobs submitted since the farm started."""
    from producer import FarmClient
    from renderfarm import keys
    from renderfarm.records import Records

    client = FarmClient(farm.settings)
    records = Records(client.redis)
    since: float | str = records.clock()
    watching: set[str] = set()
    while not stop.wait(0.5):
        try:
            fresh = client.redis.zrangebyscore(keys.JOBS, since, "+inf", withscores=True)
            for job_id, score in fresh:
                watching.add(job_id.decode())
                since = f"({score!r}"  # after the newest seen
            ended = [r for r in records.jobs(sorted(watching)) if r.terminal]
        except Exception as exc:  # a Redis blip must not end the farm
            click.echo(f"(could not read the records: {exc})")
            continue
        for record in ended:
            watching.discard(record.id)
            click.echo(_finished_line(client, record))


def _finished_line(client, record) -> str:
    t = record.timestamps
    took = t.get(record.state.value, 0) - t.get("queued", 0)
    line = f"job {record.id} {record.state} after {took:.1f} s"
    if record.error and record.state.value != "succeeded":
        line += f": {record.error}"
    for image in client.urls(record) if record.state.value == "succeeded" else []:
        line += f"  {image.url}"
    return line


@main.command()
@click.option("--workers", default=1, show_default=True, type=int)
def demo(workers: int) -> None:
    """Start the embedded farm, render 8 prompts and one img2img, print where they are, stop."""
    from renderfarm.demo import run_demo

    sys.exit(run_demo(_settings(), workers=workers))


@main.command("make-model")
@click.argument("kind", type=click.Choice(
    ["shapes", "tiny", "sd15-random", "tiny-sdxl", "tiny-flux", "sdxl-random"]))
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a model already in DIRECTORY.")
def make_model(kind: str, directory: Path, force: bool) -> None:
    """Write a model: shapes (trained, its weights shipped in the package: the demo's), or one
    with random weights: tiny (tests), sd15-random and the others (benchmarks)."""
    from worker.modelgen import make_model as build

    if directory.exists() and any(directory.iterdir()) and not force:
        _fail(f"{directory} is not empty (a farm may be using the model there); "
              "pass --force to replace it")

    try:
        path = build(kind, directory)
    except FileNotFoundError as exc:  # shapes: the package was installed without its weights
        _fail(str(exc))
    click.echo(f"wrote {kind} model to {path}")


@main.command("make-lora")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), default="peft",
              show_default=True, help="diffusers' own LoRA format, or kohya's (A1111, civitai)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--rank", default=4, show_default=True, type=int)
def make_lora(model_dir: Path, path: Path, fmt: str, seed: int, rank: int) -> None:
    """Write a LoRA with seeded random weights for the diffusers model folder MODEL_DIR to
    PATH (put it in <models dir>/loras/NAME.safetensors to use it as NAME)."""
    from worker.modelgen import make_lora as build

    try:
        build(model_dir, path, fmt, seed=seed, rank=rank)
    except ValueError as exc:
        _fail(str(exc))
    click.echo(f"wrote {fmt} LoRA to {path}")


def _redact(url: str | None) -> str:
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"

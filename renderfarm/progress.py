"""Showing a batch in the terminal: a live rich progress bar, and plain summaries."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from renderfarm.schema import BatchRecord, JobRecord, JobState

console = Console()


def follow_batch(client, batch_id: str, timeout: float | None = None, poll: float = 0.25) -> bool:
    """Show the batch's progress (per-step, across its jobs) until it ends; then where every
    image is. Returns True if every job succeeded."""
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[states]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        batch = client.records.batch(batch_id)
        task = bar.add_task(f"batch {batch_id}", total=batch.total, states="")
        while True:
            batch = client.records.batch(batch_id)
            running = batch.counts.get(JobState.rendering, 0) + batch.counts.get(
                JobState.started, 0) + batch.counts.get(JobState.uploading, 0)
            partial = _step_fraction(client, batch_id) if running else 0.0
            bar.update(task, total=batch.total, completed=min(batch.total, batch.done + partial),
                       states=_counts(batch))
            if batch.finished:
                bar.update(task, completed=batch.total)
                break
            if deadline is not None and time.monotonic() > deadline:
                console.print(f"[yellow]gave up waiting after {timeout}s[/]")
                return False
            time.sleep(poll)
    records = client.records.batch_jobs(batch_id)
    print_results(client, records)
    return all(r.state is JobState.succeeded for r in records)


def _step_fraction(client, batch_id: str) -> float:
    """Sum over the batch's running jobs of step / steps: the bar moves with every step."""
    running = client.redis.zrange("rf:running", 0, -1)
    if not running:
        return 0.0
    jobs = client.records.jobs(r.decode() for r in running)
    return sum(j.step / j.steps_total for j in jobs
               if j.batch_id == batch_id and j.steps_total and not j.terminal)


def _counts(batch: BatchRecord) -> str:
    return " ".join(f"{s.value}={n}" for s, n in batch.counts.items() if n)


def print_results(client, records: list[JobRecord]) -> None:
    for record in records:
        if record.state is JobState.succeeded:
            for image in client.urls(record):
                console.print(f"{record.id}  seed {image.seed}  {image.url}", soft_wrap=True)
        else:
            console.print(f"{record.id}  [red]{record.state.value}[/] {record.error or ''}")


def print_batch(client, batch: BatchRecord) -> None:
    console.print(f"batch {batch.id}: {batch.done}/{batch.total} done  {_counts(batch)}")
    table = Table("job", "state", "step", "seed", "worker", "attempts", "error")
    for r in client.records.batch_jobs(batch.id, 0, 200):
        table.add_row(r.id, r.state.value, f"{r.step}/{r.steps_total}", str(r.request.seed),
                      r.worker or "", str(r.attempts), r.error or "")
    console.print(table)


def print_job(client, record: JobRecord) -> None:
    console.print_json(record.model_dump_json(exclude={"request": {"init_image"}}))
    if record.state is JobState.succeeded:
        print_results(client, [record])

"""Showing a batch in the terminal: a live rich progress bar, and plain summaries."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from renderfarm.schema import BatchRecord, JobRecord, JobState

console = Console()


def follow_batch(client, batch_id: str, timeout: float | None = None, poll: float = 0.25) -> bool:
    """Show the batch's progress (per-step, across its jobs) until it ends; then where every
    image is. Returns True if every job succeeded.

    With ``RENDERFARM_DASHBOARD_URL`` set, the bar follows the batch's event stream
    (``GET /api/v1/batches/<id>/events``, Server-Sent Events: each change as it happens, no
    polling); where the dashboard cannot be reached, or its stream breaks off, it polls Redis."""
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[states]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        batch = client.records.batch(batch_id)
        task = bar.add_task(f"batch {batch_id}", total=batch.total, states="")
        url = client.settings.dashboard_url
        ended = _follow_events(url, batch_id, bar, task, deadline) if url else None
        if ended is None:
            ended = _poll_until_end(client, batch_id, bar, task, deadline, poll)
        if not ended:
            console.print(f"[yellow]gave up waiting after {timeout}s[/]")
            return False
    records = client.records.batch_jobs(batch_id)
    print_results(client, records)
    return all(r.state is JobState.succeeded for r in records)


def _poll_until_end(client, batch_id: str, bar: Progress, task, deadline: float | None,
                    poll: float) -> bool:
    while True:
        batch = client.records.batch(batch_id)
        running = batch.counts.get(JobState.rendering, 0) + batch.counts.get(
            JobState.started, 0) + batch.counts.get(JobState.uploading, 0)
        partial = _step_fraction(client, batch_id) if running else 0.0
        bar.update(task, total=batch.total, completed=min(batch.total, batch.done + partial),
                   states=_counts(batch))
        if batch.finished:
            bar.update(task, completed=batch.total)
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll)


def _follow_events(url: str, batch_id: str, bar: Progress, task,
                   deadline: float | None, tries: int = 3) -> bool | None:
    """Follow the batch's SSE stream: True when it ends, False past the deadline, None when
    the stream cannot be had (the caller polls instead). A stream that breaks off, or says
    it failed, is resumed from its last event (``Last-Event-ID``, as browsers' EventSource
    do), ``tries`` connections in all. stdlib only: the client install has no HTTP library."""
    import json
    import os
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    target = f"{url.rstrip('/')}/api/v1/batches/{quote(batch_id)}/events"
    headers = {"Accept": "text/event-stream"}
    if os.environ.get("RENDERFARM_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['RENDERFARM_TOKEN']}"
    counts: dict[str, int] = {}
    steps: dict[str, float] = {}  # running job -> fraction of its steps done
    total = 0
    last_id = ""
    for _ in range(tries):
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            # the dashboard sends a keep-alive at least every 5 s: a read timeout means it is
            # gone
            with urllib.request.urlopen(urllib.request.Request(target, headers=headers),
                                        timeout=15) as stream:  # noqa: S310 (the farm's URL)
                event, event_id = "", ""
                for raw in stream:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "error":
                        break  # the dashboard's stream failed: resume from the last event
                    elif line.startswith("data: ") and event:
                        data = json.loads(line[6:])
                        if event in ("snapshot", "end"):
                            counts, total = dict(data["counts"]), data["total"]
                            steps = {}
                        elif event == "job":
                            previous, state = data.get("from"), data.get("state")
                            if previous:
                                counts[previous] = counts.get(previous, 0) - 1
                            counts[state] = counts.get(state, 0) + 1
                            if state not in ("rendering", "started"):
                                steps.pop(data["job_id"], None)
                        elif event == "step" and data.get("steps"):
                            steps[data["job_id"]] = data["step"] / data["steps"]
                        last_id = event_id or last_id
                        done = sum(counts.get(s.value, 0) for s in JobState if s.terminal)
                        states = " ".join(f"{s}={n}" for s, n in counts.items() if n > 0)
                        bar.update(task, total=total, states=states,
                                   completed=min(total, done + sum(steps.values())))
                        if event == "end":
                            bar.update(task, completed=total)
                            return True
                    elif not line:
                        event, event_id = "", ""
                    if deadline is not None and time.monotonic() > deadline:
                        return False
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            if not last_id:
                return None  # never reached: the dashboard is not there
    return None


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
    label = f" ({escape(batch.label)})" if batch.label else ""
    console.print(f"batch {batch.id}{label}: {batch.done}/{batch.total} done  {_counts(batch)}",
                  soft_wrap=True)
    table = Table("job", "state", "step", "seed", "worker", "attempts", "error")
    table.columns[0].no_wrap = True  # a job id is copied whole (to cancel it), never cut
    table.columns[4].overflow = table.columns[6].overflow = "fold"
    for r in client.records.batch_jobs(batch.id, 0, 200):
        table.add_row(r.id, r.state.value, f"{r.step}/{r.steps_total}", str(r.request.seed),
                      r.worker or "", str(r.attempts), r.error or "")
    console.print(table)


def print_job(client, record: JobRecord) -> None:
    """A job for a person: its state and how long ago, its settings, each state's time, and
    where its images are (``status JOB --json`` gives the whole record)."""
    r, t = record.request, record.timestamps
    now = client.records.clock()
    console.print(f"job {record.id}  (batch {record.batch_id})", soft_wrap=True)
    state = f"[bold]{record.state}[/]"
    if record.state in (JobState.rendering, JobState.started):
        state += f"  step {record.step}/{record.steps_total}"
    if record.state.value in t:
        state += f"  since {_age(now - t[record.state.value])} ago"
    if record.worker:
        state += f"  on {record.worker}"
    if record.attempts > 1:
        state += f"  attempt {record.attempts}"
    console.print(f"state     {state}", soft_wrap=True)
    if record.error:
        console.print(f"error     [red]{record.error}[/]", soft_wrap=True)
    console.print(f"prompt    {r.prompt!r}", soft_wrap=True)
    if r.negative_prompt:
        console.print(f"negative  {r.negative_prompt!r}", soft_wrap=True)
    console.print(f"settings  {r.model} {r.mode.value} {r.width}x{r.height}, {r.steps} steps, "
                  f"{r.scheduler} cfg {r.guidance_scale}, seed {r.seed}, "
                  f"{r.num_images} image(s)", soft_wrap=True)
    spans = [f"{state} {_age(t[state] - t['queued'])}" for state in
             ("started", "rendering", "uploading", "succeeded", "failed", "cancelled")
             if state in t and "queued" in t]
    if "queued" in t:
        console.print(f"timeline  queued {_age(now - t['queued'])} ago; after it: "
                      + (", ".join(spans) or "nothing yet"), soft_wrap=True)
    if record.state is JobState.succeeded:
        console.print("images")
        print_results(client, [record])


def _age(seconds: float) -> str:
    """1.2 s, 4 min 3 s, 2 h 5 min, 3 d 4 h."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {m} min"
    return f"{hours // 24} d {hours % 24} h"

"""Every Redis key the farm uses, in one place. All start with ``rf:``."""

PREFIX = "rf:"
BATCHES = "rf:batches"  #: zset batch id -> created_at (newest first listing)
JOBS = "rf:jobs"  #: zset job id -> created_at (every job)
RUNNING = "rf:running"  #: zset job id -> lease expiry, for jobs a worker holds
OUTBOX = "rf:outbox"  #: zset job id -> time it went queued, until its message is sent
MODELS = "rf:models"  #: hash model name -> last time a worker advertised it
LORAS = "rf:loras"  #: hash LoRA name -> its model family, as the last worker that has it said
PLOTS = "rf:plots"  #: set of plot batch ids whose grid is not drawn (renderfarm/plotrecords.py)
COUNTS = "rf:counts"  #: hash state -> jobs in it, farm-wide (kept by records.py's scripts)
HOOKS_DUE = "rf:hooks:due"  #: zset webhook delivery id -> time of its next try (webhooks.py)


def hook(hook_id: str) -> str:
    """A webhook delivery: its event, target, attempts, last answer, body (webhooks.py)."""
    return f"rf:hook:{hook_id}"


def batch_hooks(batch_id: str) -> str:
    """List of the webhook delivery ids of a batch and its jobs, oldest first."""
    return f"rf:batch:{batch_id}:hooks"


def job(job_id: str) -> str:
    return f"rf:job:{job_id}"


def batch(batch_id: str) -> str:
    return f"rf:batch:{batch_id}"


def batch_events(batch_id: str) -> str:
    """Stream of a batch's job state changes and steps (written by records.py's scripts)."""
    return f"rf:batch:{batch_id}:events"


def preview(job_id: str) -> str:
    """A running job's latest live preview (a small JPEG), expiring soon after its last write
    (worker/previews.py), deleted as the job leaves running (records.py ``move``)."""
    return f"rf:preview:{job_id}"


def batch_jobs(batch_id: str) -> str:
    """List of a batch's job ids, in submit order."""
    return f"rf:batch:{batch_id}:jobs"


def idempotency(key: str) -> str:
    return f"rf:idem:{key}"

WORKERS = "rf:workers"  #: zset worker id -> time of its last heartbeat


def worker(worker_id: str) -> str:
    """Hash describing one worker: host, profile, device, models, current job, jobs done."""
    return f"rf:worker:{worker_id}"

QUEUES = "rf:queues"  #: set of the Celery queue names jobs have been sent to


def pending(queue: str) -> str:
    """Zset of the ids of a queue's ``queued`` jobs, best first (priority, then age).

    Workers claim from it directly for micro-batches and model affinity; the Celery message of
    a job claimed that way is dropped on delivery (the job is no longer ``queued``)."""
    return f"rf:pending:{queue}"


def fair(queue: str) -> str:
    """Zset of the ids of a queue's ``queued`` jobs that workers may take (paused batches' left
    out), in serving order: priority, then round-robin turns over batches (records.py ``_FAIR``).
    Every claim takes from it."""
    return f"rf:fair:{queue}"


def fair_clock(queue: str) -> str:
    """Hash priority band -> the turn of the last job claimed from that band of the queue."""
    return f"rf:fairclock:{queue}"


def session(sid_hash: str) -> str:
    """A dashboard login session, by the SHA-256 of its id; expires with the session's lifetime,
    deleted at logout."""
    return f"rf:session:{sid_hash}"


RATE_LIMITS = "rf:limits:"  #: prefix of the dashboard's rate-limit counters (flask-limiter)

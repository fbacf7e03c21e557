"""Helpers of the fair-share script tests (test_fair_share.py, test_fair_attacks.py): batches
recorded straight into Redis and deliveries run as a worker's would, no worker involved."""

from __future__ import annotations

from renderfarm.records import Records
from renderfarm.schema import JobRequest


def add_batch(records: Records, batch_id: str, n: int, priority: int = 5,
              first: int = 0) -> list[str]:
    """n jobs ``<batch_id>-<k>``, all of one micro-batch compat key."""
    ids = [f"{batch_id}-{k}" for k in range(first, first + n)]
    request = JobRequest(prompt="x", model="tiny", seed=1, priority=priority)
    records.add_jobs(batch_id, [(i, request) for i in ids], compat=["c"] * n)
    return ids


def take(records: Records, n: int, via: str) -> list[str]:
    """Run n deliveries of job ``via``'s message (each a turn of its queue, as a worker's) and
    return the jobs they took."""
    out = []
    for _ in range(n):
        claim = records.claim_turn(via, "w", 30, 3)
        assert claim.ok, claim
        out.append(claim.job_id)
    return out

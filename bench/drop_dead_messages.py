"""How long producer.enqueue.drop_dead_messages holds Redis over a long queue.

    .venv/bin/python bench/drop_dead_messages.py --messages 50000

A redis-server of its own (renderfarm.embedded.EmbeddedRedis), ``--messages`` jobs recorded
and cancelled, and one kombu-shaped message per job (JSON with ``headers.id``, a 600-byte
body) pushed on the queue's list, as a cancelled batch leaves them. Then drop_dead_messages
(what FarmClient.cancel_batch runs after cancelling DROP_MESSAGES_AT or more queued jobs: one
script over every message waiting in the queue), with Redis' SLOWLOG giving its script's time:
all that time Redis answers no other client. The code under test is whatever is on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis

from producer.enqueue import drop_dead_messages
from renderfarm.embedded import EmbeddedRedis
from renderfarm.records import Records
from renderfarm.schema import JobRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--all", action="store_true",
                        help="pass over the queue whatever its length (the farm skips queues "
                        "of more than producer.enqueue.DROP_DEAD_MAX messages)")
    args = parser.parse_args()
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="rf-bench-")))
    server.start()
    try:
        print(json.dumps(run(server.url.split("?")[0], args.messages, args.all), indent=2))
    finally:
        server.stop()


def run(url: str, n: int, everything: bool = False) -> dict:
    redis = Redis.from_url(url, socket_timeout=None)
    records = Records(redis)
    request = JobRequest(prompt="x", model="tiny", seed=1)
    records.add_jobs("big", [(f"j{k}", request) for k in range(n)])
    pipe = redis.pipeline(transaction=False)
    for k in range(n):
        records._cancel(keys=records._keys(f"j{k}"), args=[f"j{k}"], client=pipe)
        pipe.lpush("renderfarm", json.dumps({
            "body": "x" * 600, "headers": {"id": f"j{k}", "task": "renderfarm.render"},
            "properties": {"delivery_tag": f"t{k}", "priority": 0}}))
        if k % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    redis.config_set("slowlog-log-slower-than", 50_000)
    redis.slowlog_reset()
    started = time.monotonic()
    dropped = drop_dead_messages(redis, ["renderfarm"], most=n if everything else None)
    seconds = time.monotonic() - started
    slow = redis.slowlog_get(1000)
    return {"messages": n, "dropped": dropped, "seconds": round(seconds, 2),
            "longest_command_s": round(max((e["duration"] for e in slow), default=0) / 1e6, 2),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


if __name__ == "__main__":
    main()

"""A plot's grid drawn by two workers: the first one's claim ran out while it drew (a slow
draw, a stalled upload), so a second one took it. Real Redis, a database of this module's own;
the claims and finishes are the workers' own calls (renderfarm/plotrecords.py)."""

from __future__ import annotations

import pytest
from redis import Redis

from renderfarm.plotrecords import PlotRecords
from renderfarm.records import Records
from renderfarm.schema import JobRequest


@pytest.fixture
def records(module_redis_url) -> Records:
    redis = Redis.from_url(module_redis_url)
    redis.flushdb()
    return Records(redis)


def test_a_grid_drawn_twice_records_one_batch_completed(records):
    request = JobRequest(prompt="x", model="tiny", seed=1)
    records.add_jobs("p", [("p-0", request)], webhook_url="http://hooks.example/in")
    plots = PlotRecords(records.redis)
    plots.set_plot("p", {"cells": ["p-0"], "shape": [1, 1, 1], "axes": {}, "job": {}})
    assert records.cancel("p-0") == "cancelled"
    slow = plots.claim("p", "slow-worker", seconds=0)  # its claim runs out while it draws
    other = plots.claim("p", "other-worker")
    assert slow.ok and other.ok and slow.epoch == other.epoch
    grids = [{"key": "p/grid.png", "z": 0, "width": 64, "height": 64}]
    plots.finish("p", other.epoch, grids)
    plots.finish("p", slow.epoch, grids)  # the slow one ends after
    hooks = records.redis.lrange("rf:batch:p:hooks", 0, -1)
    kinds = [records.redis.hget(b"rf:hook:" + h, "type") for h in hooks]
    assert kinds.count(b"batch.completed") == 1, kinds

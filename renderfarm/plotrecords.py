"""A plot's records in Redis: its definition and who draws its grid, exactly once.

A plot is an ordinary batch (``rf:batch:<id>``) with three more fields: ``plot`` (its
definition: the base job, the axes and the job of each cell), ``grid_epoch`` (bumped in the
same step as a cell is retried: renderfarm/records.py's retry script) and, once drawn, ``grids``
(JSON ``[{"key": ...}]``) with ``grid_done`` = the epoch they were drawn for. The set
``rf:plots`` holds the plots whose grid is not drawn yet.

Who draws: the worker that ends a plot's last cell tries :meth:`PlotRecords.claim` at once;
every worker's background thread also tries the plots in ``rf:plots`` every few seconds (a cell
cancelled while queued, or failed by the reaper, ends without a worker to notice). The claim is
one Lua script: it grants a plot's grid only when no cell is queued or running, and only once
per epoch, so two workers ending the last two cells at once draw it once. A claim is held for
``GRID_CLAIM_SECONDS``: a worker that dies while drawing leaves it to the next sweep after that.
One that is only slow (still drawing when its claim runs out) and the worker that took the claim
over both store the same grid; it is recorded once, with one ``batch.completed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis import Redis

from renderfarm import keys
from renderfarm.records import HOOK_LUA

GRID_CLAIM_SECONDS = 120.0

# KEYS: batch.  ARGV: owner, claim seconds.
_CLAIM = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
if redis.call('HEXISTS', KEYS[1], 'plot') == 0 then return {'none', ''} end
for _, s in ipairs({'queued', 'started', 'rendering', 'uploading'}) do
  if tonumber(redis.call('HGET', KEYS[1], 'n:' .. s) or '0') > 0 then return {'running', ''} end
end
local epoch = redis.call('HGET', KEYS[1], 'grid_epoch') or '0'
if redis.call('HGET', KEYS[1], 'grid_done') == epoch then return {'done', epoch} end
local now = clock()
if redis.call('HGET', KEYS[1], 'grid_claim') == epoch and
    tonumber(redis.call('HGET', KEYS[1], 'grid_claim_until') or '0') > now then
  return {'taken', epoch}
end
redis.call('HSET', KEYS[1], 'grid_claim', epoch, 'grid_claim_until', now + tonumber(ARGV[2]),
  'grid_owner', ARGV[1])
return {'ok', epoch}
"""

# KEYS: batch.  ARGV: batch id, epoch, grids JSON.  The grids are recorded only if no cell was
# retried since the claim (else the next claim draws them again); returns 1 if recorded. A
# plot's batch.completed webhook is recorded here, not when its last cell ends: its receiver
# gets the grid's URL and finds the grid stored (again after a retry's grid).
_FINISH = HOOK_LUA + """
if (redis.call('HGET', KEYS[1], 'grid_epoch') or '0') ~= ARGV[2] then return 0 end
-- drawn for this epoch already (a worker whose claim ran out while it drew, and the worker
-- that took it over): recorded once, one batch.completed
if redis.call('HGET', KEYS[1], 'grid_done') == ARGV[2] then return 1 end
redis.call('HSET', KEYS[1], 'grids', ARGV[3], 'grid_done', ARGV[2])
redis.call('HDEL', KEYS[1], 'grid_claim', 'grid_claim_until')
redis.call('SREM', 'rf:plots', ARGV[1])
local url = redis.call('HGET', KEYS[1], 'webhook')
if url then
  local t = redis.call('TIME')
  hook(url, 'batch.completed', KEYS[1], 'batch_' .. ARGV[1], ARGV[1], '',
    tonumber(t[1]) + tonumber(t[2]) / 1000000)
end
return 1
"""


@dataclass(frozen=True)
class GridClaim:
    """The answer to "may I draw this plot's grid?"."""

    status: str  #: ok | none (not a plot) | running (cells not ended) | done | taken
    epoch: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class PlotRecords:
    def __init__(self, redis: Redis):
        self.redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)

    def set_plot(self, batch_id: str, definition: dict[str, Any]) -> None:
        """Record a just-submitted batch as a plot (before its cells' messages are sent)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.batch(batch_id), mapping={"plot": json.dumps(definition)})
        pipe.hsetnx(keys.batch(batch_id), "grid_epoch", 0)
        pipe.sadd(keys.PLOTS, batch_id)
        pipe.execute()

    def plot(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(keys.batch(batch_id), "plot")
        return json.loads(raw) if raw else None

    def grids(self, batch_id: str) -> list[dict[str, Any]]:
        raw = self.redis.hget(keys.batch(batch_id), "grids")
        return json.loads(raw) if raw else []

    def claim(self, batch_id: str, owner: str,
              seconds: float = GRID_CLAIM_SECONDS) -> GridClaim:
        """Take the drawing of the plot's grid if every cell has ended and nobody has drawn
        it for the current epoch (atomic: one caller gets ``ok``)."""
        status, epoch = self._claim(keys=[keys.batch(batch_id)], args=[owner, seconds])
        return GridClaim(status.decode(), epoch.decode())

    def claim_for_job(self, job_id: str, owner: str) -> tuple[str, GridClaim]:
        """:meth:`claim` of the plot of job ``job_id`` (the worker that just ended it)."""
        raw = self.redis.hget(keys.job(job_id), "batch_id")
        if not raw:
            return "", GridClaim("none")
        batch_id = raw.decode()
        return batch_id, self.claim(batch_id, owner)

    def finish(self, batch_id: str, epoch: str, grids: list[dict[str, Any]]) -> bool:
        """Record the grids drawn for ``epoch``; False if a cell was retried meanwhile."""
        return bool(self._finish(keys=[keys.batch(batch_id)],
                                 args=[batch_id, epoch, json.dumps(grids)]))

    def waiting(self, limit: int = 50) -> list[str]:
        """Plots whose grid is not drawn (yet, or again after a retry)."""
        return [b.decode() for b in self.redis.srandmember(keys.PLOTS, limit) or []]

    def forget(self, batch_id: str) -> None:
        """Drop a batch from the waiting plots (it is gone, or is no plot)."""
        self.redis.srem(keys.PLOTS, batch_id)

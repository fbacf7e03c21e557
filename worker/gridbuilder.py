"""Assembling a plot's grid once its cells have ended: claim, fetch the cells, draw, store.

Who draws (renderfarm/plotrecords.py has the atomic claim): the worker that ends a plot's last
cell (``offer_job``, called as each job ends here), and, as a fallback, any worker's sweep of
the plots still waiting (``sweep``, every few seconds from the worker's background thread):
a cell cancelled while queued or failed by the reaper ends with no worker to notice. The work
runs on a thread of its own, never on the render or lease threads.

Grids are stored as ``<batch>/grid.png`` (a plot without a Z axis) or ``<batch>/grid-z<k>.png``
(one per Z value, k from 0), each a PNG whose ``renderfarm`` JSON chunk holds the plot's
definition, the grid's layout and each cell's job and state. A rebuilt grid (after a retry)
replaces the earlier object at the same key. Each cell shows the first image of its job.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from typing import Any

from PIL import Image

from renderfarm import keys
from renderfarm.errors import BadRecord
from renderfarm.grids import draw_grid
from renderfarm.plotrecords import PlotRecords
from renderfarm.records import Records
from renderfarm.schema import JobRecord, JobState
from storage.png import encode_png

log = logging.getLogger("renderfarm.worker")


def grid_key(batch_id: str, z: int, has_z: bool) -> str:
    """Where a plot's grid is stored: ``<batch>/grid.png``, or ``grid-z<k>.png`` per Z value."""
    return f"{batch_id}/grid-z{z}.png" if has_z else f"{batch_id}/grid.png"


#: Largest grid drawn, in pixels (cells only); a plot whose cells would make a larger one has
#: its cells scaled down to fit (100 cells of 1024x1024 would be a 300 MB bitmap otherwise).
GRID_MAX_PIXELS = 64 * 2**20


class GridBuilder:
    def __init__(self, records: Records, storage, owner: str,
                 max_pixels: int = GRID_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.records = records
        self.plots = PlotRecords(records.redis)
        self.storage = storage
        self.owner = owner
        self._work: queue.Queue = queue.Queue(maxsize=1000)
        self._thread: threading.Thread | None = None

    # -- the worker's thread ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="grids", daemon=True)
            self._thread.start()

    def offer_job(self, job_id: str) -> None:
        """Job ``job_id`` ended here: if it was its plot's last cell, draw the grid."""
        self._offer(("job", job_id))

    def sweep(self) -> None:
        """Try every plot whose grid is waiting (the fallback of :meth:`offer_job`)."""
        for batch_id in self.plots.waiting():
            self._offer(("batch", batch_id))

    def _offer(self, item: tuple[str, str]) -> None:
        try:
            self._work.put_nowait(item)
        except queue.Full:  # the sweep comes back to it
            pass

    def _loop(self) -> None:
        while True:
            kind, ident = self._work.get()
            try:
                if kind == "job":
                    batch_id, claim = self.plots.claim_for_job(ident, self.owner)
                    if claim.ok:
                        self.draw(batch_id, claim.epoch)
                else:
                    self.build(ident)
            except Exception:  # one bad plot never stops the thread
                log.exception("grid of %s %s failed", kind, ident)

    # -- drawing ----------------------------------------------------------------------------
    def build(self, batch_id: str) -> list[dict[str, Any]] | None:
        """Claim and draw the plot's grid now. Returns the grids stored, or None when this
        caller did not draw them (not a plot, cells still running, drawn or being drawn)."""
        claim = self.plots.claim(batch_id, self.owner)
        if claim.status == "none":
            self.plots.forget(batch_id)
        if not claim.ok:
            return None
        return self.draw(batch_id, claim.epoch)

    def draw(self, batch_id: str, epoch: str) -> list[dict[str, Any]] | None:
        """Draw and store the grids of a plot this caller has claimed for ``epoch``."""
        definition = self.plots.plot(batch_id)
        if definition is None:
            return None
        ids: list[str] = definition["cells"]
        nx, ny, nz = definition["shape"]
        axes = definition["axes"]
        found = self.records.read(ids)
        has_z = "z" in axes
        grids = []
        for z in range(nz):
            cells: list[list[Image.Image | str]] = []
            states = []
            for y in range(ny):
                row: list[Image.Image | str] = []
                for x in range(nx):
                    job_id = ids[x + nx * (y + ny * z)]
                    cell, state = self._cell(found.get(job_id))
                    row.append(cell)
                    states.append({"col": x, "row": y, "job_id": job_id, "state": state})
                cells.append(row)
            scale = self._scale(cells)
            if scale < 1:
                cells = [[_scaled(c, scale) for c in row] for row in cells]
            title = axes["z"]["labels"][z] if has_z else ""
            grid, layout = draw_grid(cells, axes["x"]["labels"] if "x" in axes else [],
                                     axes["y"]["labels"] if "y" in axes else [], title)
            key = grid_key(batch_id, z, has_z)
            meta = {"batch_id": batch_id, "grid": {"z": z, "epoch": int(epoch), "scale": scale},
                    "plot": definition, "layout": layout.to_dict(), "cells": states}
            data = encode_png(grid, _parameters(definition, z), meta)
            current = self.records.redis.hget(keys.batch(batch_id), "grid_epoch") or b"0"
            if current != epoch.encode():
                log.info("plot %s: a cell was retried while drawing; left to the next claim",
                         batch_id)
                return None
            self.storage.delete(key)  # a rebuilt grid replaces the last one (first writer wins)
            self.storage.put(key, data, "image/png", {"batch-id": batch_id, "grid-z": str(z)})
            grids.append({"key": key, "z": z, "width": layout.width, "height": layout.height})
        if not self.plots.finish(batch_id, epoch, grids):
            log.info("plot %s: a cell was retried while drawing; drawn again later", batch_id)
            return None
        log.info("plot %s: %d grid(s) stored", batch_id, len(grids))
        return grids

    def _scale(self, cells: list[list[Image.Image | str]]) -> float:
        """The factor that keeps the grid's cells within ``max_pixels`` (1: as they are)."""
        images = [c for row in cells for c in row if isinstance(c, Image.Image)]
        if not images:
            return 1.0
        w, h = max(i.width for i in images), max(i.height for i in images)
        area = w * h * len(cells) * len(cells[0])
        return 1.0 if area <= self.max_pixels else (self.max_pixels / area) ** 0.5

    def _cell(self, found: JobRecord | BadRecord | None) -> tuple[Image.Image | str, str]:
        if found is None:
            return "missing", "missing"
        if isinstance(found, BadRecord):
            return "unreadable record", "unreadable"
        state = found.state.value
        if found.state is not JobState.succeeded or not found.results:
            return state, state
        try:
            with Image.open(io.BytesIO(self.storage.get(found.results[0].key))) as image:
                return image.convert("RGB"), state
        except (KeyError, OSError) as exc:
            log.warning("plot cell %s: image unreadable: %s", found.id, exc)
            return "image missing", state


def _scaled(cell: Image.Image | str, scale: float) -> Image.Image | str:
    if not isinstance(cell, Image.Image):
        return cell
    size = (max(1, round(cell.width * scale)), max(1, round(cell.height * scale)))
    return cell.resize(size, Image.Resampling.LANCZOS)


def _parameters(definition: dict[str, Any], z: int) -> str:
    """The grid's ``parameters`` text: its axes, as A1111 lists a grid's (readable, not a
    job's infotext: a grid is no one job)."""
    axes = definition["axes"]
    parts = [f"X/Y/Z plot: {definition['job'].get('prompt', '')}"]
    for name in ("x", "y", "z"):
        if name in axes:
            values = axes[name]["labels"]
            parts.append(f"{name.upper()}: " + (values[z] if name == "z" else ", ".join(values)))
    return "\n".join(parts)

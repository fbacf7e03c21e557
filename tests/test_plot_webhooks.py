"""A plot with a webhook_url: its batch.completed says where the grid is, and comes only once
the grid is stored (a receiver that fetches the grid on batch.completed must find it). The
session farm's worker draws the grid (its sweep) and delivers the events."""

from __future__ import annotations

import urllib.request

import pytest

from tests.conftest import WEBHOOK_SECRET
from tests.webhook_receiver import Receiver

JOB = {"prompt": "a red barn", "model": "tiny", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def receiver():
    running = Receiver(WEBHOOK_SECRET)
    yield running
    running.close()


def completed(got) -> list:
    return [r for r in got if r.payload and r.payload["type"] == "batch.completed"]


def test_a_plots_batch_completed_names_its_stored_grid(farm, farm_settings, receiver):
    from producer import FarmClient

    # cells on a queue no worker takes, cancelled while queued: the worker's sweep draws
    elsewhere = FarmClient(farm_settings.model_copy(update={"queue": "nobody"}))
    batch = elsewhere.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2]}},
                                  webhook_url=receiver.url)
    batch.cancel()
    [done] = completed(receiver.wait_for(lambda got: completed(got), timeout=60))
    [grid] = done.payload["data"]["grids"]
    assert grid["key"].endswith(f"{batch.id}/grid.png")
    with urllib.request.urlopen(grid["url"], timeout=10) as response:  # stored before the event
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(completed(receiver.received)) == 1

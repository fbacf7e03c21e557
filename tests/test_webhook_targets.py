"""Webhook targets and tries under attack (renderfarm/webhook_targets.py, renderfarm/webhooks.py):
addresses that are not on the public internet although Python calls them neither private nor
loopback, a receiver that trickles its answer to hold a deliverer forever, and a deliverer that
claims more deliveries than it is sending. Real sockets, a real Redis; no worker needed."""

from __future__ import annotations

import socket
import threading

import pytest
from redis import Redis

from renderfarm.records import Records
from renderfarm.schema import ImageResult, JobRequest
from renderfarm.webhook_targets import TargetRefused, checked_addresses, post
from renderfarm.webhooks import WebhookSender, batch_deliveries
from tests.conftest import WEBHOOK_SECRET
from tests.webhook_receiver import Receiver


@pytest.mark.parametrize("url, address", [
    # carrier-grade NAT space (RFC 6598): Alibaba Cloud's metadata service lives there
    ("http://100.100.100.200/latest/meta-data/", "100.100.100.200"),
    ("http://100.64.0.1/hook", "100.64.0.1"),
    # 6to4 of 127.0.0.1 and of the link-local metadata address
    ("http://[2002:7f00:1::]/hook", "2002:7f00:1::"),
    ("http://[2002:a9fe:a9fe::]/hook", "2002:a9fe:a9fe::"),
])
def test_non_global_addresses_refused(url, address):
    with pytest.raises(TargetRefused) as raised:
        checked_addresses(url, allow_private=False)
    assert f"resolves to {address}" in str(raised.value)
    assert checked_addresses(url, allow_private=True) == [address]


def test_public_addresses_still_allowed():
    assert checked_addresses("http://93.184.215.14/hook", False) == ["93.184.215.14"]
    assert checked_addresses("https://[2606:4700::1111]/hook", False) == ["2606:4700::1111"]


class Trickler:
    """A receiver that answers ``200 OK`` one byte of header at a time, each byte well within
    the sender's per-read timeout, so its answer takes several timeouts in all."""

    def __init__(self, gap: float, padding: int):
        self.gap, self.padding = gap, padding
        self.stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                for _ in range(self.padding):
                    if self.stop.wait(self.gap):
                        return
                    conn.sendall(b"a")
                conn.sendall(b"\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.server.close()


def test_a_trickled_answer_is_a_timed_out_try():
    """RENDERFARM_WEBHOOK_TIMEOUT bounds the whole try, not each read: a receiver sending a byte
    every 0.2 s for ~3 s does not get its 200 counted with a 0.5 s timeout (else one such
    receiver holds a deliverer's thread for as long as it likes)."""
    trickler = Trickler(gap=0.2, padding=15)
    try:
        with pytest.raises(OSError) as raised:
            post(trickler.url, b"{}", {}, timeout=0.5, allow_private=True)
        assert "0.5" in str(raised.value)
    finally:
        trickler.close()


@pytest.fixture(scope="module")
def hook_settings(farm_settings, module_redis_url):
    return farm_settings.model_copy(update={"redis_url": module_redis_url,
                                            "webhook_timeout": 5.0})


def test_a_sender_claims_only_what_it_is_sending(hook_settings):
    """While a sender waits on one slow receiver, the other due deliveries stay unclaimed (any
    other sender may take them): a claim covers one try, so no delivery waits behind another's
    timeouts until its claim runs out and it is sent twice at once."""
    from producer import FarmClient

    hanging, healthy = Receiver(WEBHOOK_SECRET), Receiver(WEBHOOK_SECRET)
    hanging.hang = threading.Event()
    redis = Redis.from_url(hook_settings.redis_url)
    records = Records(redis)
    try:
        records.add_jobs("wt1", [
            ("wt1-a", JobRequest(prompt="a", model="tiny", webhook_url=hanging.url)),
            ("wt1-b", JobRequest(prompt="b", model="tiny", webhook_url=healthy.url))])
        records.cancel("wt1-a")
        records.cancel("wt1-b")
        sender = WebhookSender(hook_settings, FarmClient(hook_settings), "slow-one")
        worker = threading.Thread(target=sender.run_once, daemon=True)
        worker.start()
        hanging.wait_for(lambda got: len(got) == 1, timeout=10)  # busy with wt1-a
        by_job = {d["job_id"]: d for d in batch_deliveries(redis, "wt1")}
        assert by_job["wt1-a"]["attempts"] == 1
        assert by_job["wt1-b"]["attempts"] == 0, "claimed while its sender is busy elsewhere"
        other = WebhookSender(hook_settings, FarmClient(hook_settings), "free-one")
        assert other.run_once() == 1
        assert len(healthy.received) == 1
        hanging.hang.set()
        worker.join(15)
    finally:
        hanging.hang.set()
        hanging.close()
        healthy.close()


def test_a_job_event_tells_the_end_it_was_recorded_for(hook_settings):
    """job.failed's body is built at its first try: if the job was retried and succeeded
    before that try (deliverers busy, or none running), the body still tells the failure (its
    error, no images), not the later success's images under job.failed."""
    from producer import FarmClient

    receiver = Receiver(WEBHOOK_SECRET)
    redis = Redis.from_url(hook_settings.redis_url)
    records = Records(redis)
    try:
        records.add_jobs("wt2", [("wt2-a", JobRequest(prompt="a", model="tiny",
                                                        webhook_url=receiver.url))])
        assert records.claim("wt2-a", "w1", 30, 3).ok
        records.fail("wt2-a", "w1", "CUDA out of memory")
        assert records.retry("wt2-a")
        assert records.claim("wt2-a", "w2", 30, 3).ok
        records.succeed("wt2-a", "w2", [ImageResult(key="wt2/a-0.png", seed=1, width=64,
                                                    height=64)])
        sender = WebhookSender(hook_settings, FarmClient(hook_settings), "late")
        while sender.run_once():
            pass
        got = {r.payload["type"]: r.payload["data"] for r in receiver.received if r.payload}
        assert (got["job.failed"]["error"], got["job.failed"]["images"]) == (
            "CUDA out of memory", [])
        assert got["job.succeeded"]["error"] is None
        assert [i["key"] for i in got["job.succeeded"]["images"]][0].endswith("wt2/a-0.png")
    finally:
        receiver.close()


def test_an_ipv6_literal_without_a_port_goes_to_port_80():
    """``http://[::1]/hook`` is port 80 of ::1 (http.client read the last group of a bare IPv6
    host as its port: [::1] went to port 1, [2606:4700::1111] to port 1111)."""
    try:
        server = socket.create_server(("::1", 80), family=socket.AF_INET6)
    except OSError as exc:  # not root, or no IPv6 here
        pytest.skip(f"cannot listen on [::1]:80: {exc}")
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            seen.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert post("http://[::1]/hook", b"{}", {}, timeout=5, allow_private=True).status == 204
        thread.join(5)
        assert b"\r\nHost: [::1]\r\n" in seen[0]
    finally:
        server.close()

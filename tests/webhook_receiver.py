"""A real webhook receiver for the tests: an HTTP server thread on 127.0.0.1 that checks every
request with the reference Standard Webhooks verifier (``standardwebhooks``), as a user's
receiver would, and answers with the status the test sets."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    payload: dict | None  #: the verified JSON; None when verification failed
    error: str = ""
    answered: int = 0


@dataclass
class Receiver:
    secret: str
    status: int = 200  #: what the next requests are answered with
    location: str = ""  #: a Location header to answer with (a redirect, with a 3xx status)
    hang: threading.Event | None = None  #: when set here, requests wait for it before answering
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self
        self._changed = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload, error = Webhook(receiver.secret).verify(body, headers), ""
                except WebhookVerificationError as exc:
                    payload, error = None, str(exc)
                status = receiver.status
                if receiver.hang is not None:
                    with receiver._changed:  # seen, then held past the sender's timeout
                        receiver.received.append(Received(headers, body, payload, error, 0))
                        receiver._changed.notify_all()
                    receiver.hang.wait(30)
                    return
                self.send_response(status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"receiver says no")
                with receiver._changed:
                    receiver.received.append(Received(headers, body, payload, error, status))
                    receiver._changed.notify_all()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks?from=farm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, test, timeout: float = 30.0) -> list[Received]:
        """Block until ``test(received)`` is true; the list of requests so far."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not test(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receiver got {[r.payload for r in self.received]}")
                self._changed.wait(left)
            return list(self.received)

    def of_type(self, kind: str, status: int = 200) -> list[Received]:
        return [r for r in self.received if r.payload and r.payload["type"] == kind
                and r.answered == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def body(received: Received) -> dict:
    return json.loads(received.body)

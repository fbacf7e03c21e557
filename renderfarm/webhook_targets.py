"""Where a webhook may be sent, and sending one POST there.

A webhook URL is given by whoever submits a job, and the farm's own processes POST to it: that
makes it a server-side request forgery vector (a worker inside a cloud network can reach the
metadata service at 169.254.169.254, Redis on 127.0.0.1, the office LAN). So a target whose
host resolves to a loopback, private, link-local, multicast, reserved or unspecified address is
refused, at submit and again at every attempt (DNS can change in between), unless
``RENDERFARM_WEBHOOK_ALLOW_PRIVATE=1``; so is any other address off the public internet
(carrier-grade NAT space 100.64.0.0/10: Alibaba Cloud's metadata service is 100.100.100.200)
and an IPv6 address wrapping a refused IPv4 one (IPv4-mapped, 6to4, Teredo). The connection
goes to the very address that was checked (no second lookup a rebinding DNS could answer
differently), redirects are never followed, and each attempt is bounded as a whole by
``timeout`` (a receiver trickling its answer a byte at a time does not hold the deliverer).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit


class TargetRefused(ValueError):
    """The URL's host resolves to an address webhooks may not reach (or does not resolve)."""


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal: itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:  # gaierror; a NUL or overlong name
        raise TargetRefused(f"host {host!r} does not resolve ({exc})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def _forbidden(address: str) -> str | None:
    """Why this address may not be a webhook target, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if wrapped is not None:  # the IPv4 address it reaches decides
            return _forbidden(str(wrapped))
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10, shared (carrier-grade NAT) space
        return "non-public"
    return None


def checked_addresses(url: str, allow_private: bool) -> list[str]:
    """The addresses the URL's host resolves to, all of them allowed; else
    :class:`TargetRefused` saying which address is refused and why."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            why = _forbidden(address)
            if why:
                raise TargetRefused(
                    f"resolves to {address}, a {why} address: refused (SSRF); "
                    "RENDERFARM_WEBHOOK_ALLOW_PRIVATE=1 allows it"
                )
    return addresses


@dataclass(frozen=True)
class Answer:
    status: int
    text: str  #: the start of the response body, for the delivery's record


class _Deadline:
    """Cuts a connection's socket once the whole try has taken ``timeout`` (the socket's own
    timeout bounds each read only: a byte every few seconds would never trip it)."""

    expired: threading.Event
    sock: socket.socket | None

    def cut(self) -> None:
        self.expired.set()
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _connected(self, sock: socket.socket) -> socket.socket:
        if self.expired.is_set():  # the deadline passed while connecting
            sock.close()
            raise TimeoutError("the deadline passed while connecting")
        return sock


class _PinnedHTTP(_Deadline, http.client.HTTPConnection):
    """An HTTP connection to the address that was checked, whatever DNS says now."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self.expired = threading.Event()

    def connect(self) -> None:
        self.sock = self._connected(
            socket.create_connection((self._address, self.port), self.timeout))


class _PinnedHTTPS(_Deadline, http.client.HTTPSConnection):
    """HTTPS to the checked address; the certificate is still checked against the host name."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address
        self.expired = threading.Event()

    def connect(self) -> None:
        sock = self._connected(socket.create_connection((self._address, self.port),
                                                        self.timeout))
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float,
         allow_private: bool) -> Answer:
    """POST ``body`` to ``url`` once: no redirects followed (a 3xx is the answer). Raises
    :class:`TargetRefused` for a forbidden target, OSError / http.client errors when the
    receiver cannot be reached or answers garbage."""
    parts = urlsplit(url)
    address = checked_addresses(url, allow_private)[0]
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal: bracketed, else http.client reads its last group as a port
        host = f"[{host}]"
    connection = kind(host, parts.port, address, timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    deadline = threading.Timer(timeout, connection.cut)
    deadline.start()
    try:
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "renderfarm-webhooks",
            **headers,
        })
        response = connection.getresponse()
        text = response.read(500).decode("utf-8", "replace")
    except Exception as exc:
        if connection.expired.is_set():
            raise TimeoutError(f"timed out: no whole answer within {timeout} s") from exc
        raise
    finally:
        deadline.cancel()
        connection.close()
    if connection.expired.is_set():  # cut mid-body: the answer is not whole
        raise TimeoutError(f"timed out: no whole answer within {timeout} s")
    return Answer(response.status, text)

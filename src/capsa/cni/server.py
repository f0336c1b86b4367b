"""The CNI daemon's HTTP server: blocking threads of its own, none of the event loop.

A CNI call is a runtime waiting on a pod: capsa-cni's one POST, answered as soon as the daemon's
work is done. Served on the event loop that ``capsa up`` shares with the API, the scheduler and
the agents, each call paid the loop's hand-offs (accept, parse, a hop to a netlink thread and back)
and waited behind whatever the loop was doing (a network agent's pass that the previous call's
write woke, a page of a thousand capsules): 0.7 ms of a 12 ms ADD, and 1 ms of a DEL, in the
benchmark. Here every thread waits in ``accept`` on the listening socket itself, and the thread
that accepts a connection reads it, runs the handler and answers it, with no hand-off at all.

Each connection carries one request (``Connection: close``): capsa-cni sends one and reads the
answer up to its Content-Length. The server keeps one thread waiting in ``accept`` besides those
serving calls, starting another as one takes a connection, up to ``max_threads`` (a call may wait
seconds: an ADD for the firewall); beyond that, connections wait in the listen backlog. Threads
stay once started, idle in ``accept``.

A handler's answer may carry ``after``: work that runs on the same thread once the answer is sent
and the connection closed (a DEL's veth deletion, log lines), so that the caller never waits for
it; :meth:`ThreadedHttpServer.stop` waits for it like for the calls themselves.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from capsa.log import get_logger

log = get_logger(__name__)

# A connection that sends nothing for this long is dropped: capsa-cni writes its request at once.
READ_TIMEOUT_S = 30.0
# The answer goes to a plugin that waits for it; one that does not read is dropped after this.
WRITE_TIMEOUT_S = 30.0
DEFAULT_MAX_HEAD = 1 << 20
DEFAULT_MAX_BODY = 16 << 20
_BACKLOG = 128
# How long a thread waits before it accepts again after accept failed.
_ACCEPT_RETRY_S = 0.1


@dataclass
class HttpRequest:
    method: str
    path: str
    # Names in lower case.
    headers: dict[str, str]
    body: bytes
    connection: socket.socket = field(repr=False)

    def client_gone(self) -> bool:
        """Whether the client closed its end (the runtime killed the plugin that sent this).
        On the thread serving the request."""
        # A socket with a timeout waits for data before it reads, whatever the flags say.
        timeout = self.connection.gettimeout()
        self.connection.setblocking(False)
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self.connection.settimeout(timeout)


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    # Runs on the serving thread once the answer is out and the connection closed.
    after: Callable[[], None] | None = None


Handler = Callable[[HttpRequest], HttpResponse]


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class ThreadedHttpServer:
    """Serves ``handler`` on a unix socket (a Path) or a loopback (host, port)."""

    def __init__(
        self,
        listen: tuple[str, int] | Path,
        handler: Handler,
        *,
        max_threads: int,
        name: str,
        max_head: int = DEFAULT_MAX_HEAD,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be 1 or more, not {max_threads}")
        self._listen = listen
        self._handler = handler
        self._max_threads = max_threads
        self._name = name
        self._max_head = max_head
        self._max_body = max_body
        self._socket: socket.socket | None = None
        self._guard = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._waiting = 0
        self._stopping = False

    @property
    def address(self) -> tuple[str, int] | Path:
        """Where it listens: the unix socket's path, or (host, port) with port 0 resolved."""
        if self._socket is None or isinstance(self._listen, Path):
            return self._listen
        host, port = self._socket.getsockname()[:2]
        return host, port

    @property
    def threads(self) -> int:
        with self._guard:
            return len(self._threads)

    @property
    def idle_threads(self) -> int:
        """Threads waiting in ``accept``: those not serving a call or its work after the answer."""
        with self._guard:
            return self._waiting

    def start(self) -> None:
        """Listens, and starts the first thread; raises OSError when it cannot listen."""
        self._socket = _listening_socket(self._listen)
        with self._guard:
            self._start_thread()

    def stop(self) -> None:
        """Stops accepting connections, and returns once the calls under way, and the work they
        left for after their answers, are done."""
        with self._guard:
            if self._socket is None or self._stopping:
                return
            self._stopping = True
            threads = list(self._threads)
        # shutdown wakes the threads blocked in accept (they get EINVAL); close alone would not.
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join()
        self._socket.close()
        if isinstance(self._listen, Path):
            self._listen.unlink(missing_ok=True)

    def _start_thread(self) -> None:
        # The caller holds the guard.
        thread = threading.Thread(
            target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        self._waiting += 1
        thread.start()

    def _serve(self) -> None:
        assert self._socket is not None
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                if self._stopping:
                    with self._guard:
                        self._waiting -= 1
                    return
                log.exception("the CNI daemon cannot accept a connection")
                # Out of file descriptors, say: not a tight loop of failures meanwhile.
                time.sleep(_ACCEPT_RETRY_S)
                continue
            with self._guard:
                self._waiting -= 1
                growing = not self._stopping and len(self._threads) < self._max_threads
                if not self._waiting and growing:
                    self._start_thread()
            try:
                self._serve_connection(connection)
            except Exception:
                # A thread that died would still be counted as waiting in accept.
                log.exception("the CNI daemon failed to serve a connection")
            finally:
                with self._guard:
                    self._waiting += 1

    def _serve_connection(self, connection: socket.socket) -> None:
        after = None
        with connection:
            try:
                connection.settimeout(READ_TIMEOUT_S)
                try:
                    request = self._read_request(connection)
                except BadRequest as exc:
                    # Not capsa-cni's doing: someone else reached the socket, or a broken client.
                    log.warning(
                        "refused a malformed request", status=int(exc.status), error=str(exc)
                    )
                    response = HttpResponse(exc.status, f"{exc}\n".encode(), "text/plain")
                else:
                    response = self._respond(request)
                after = response.after
                connection.settimeout(WRITE_TIMEOUT_S)
                connection.sendall(_encode(response))
            except OSError as exc:
                # The client went away or stalled: nobody is left to tell.
                log.info("a CNI daemon connection ended early", error=str(exc))
        if after is not None:
            try:
                after()
            except Exception:
                log.exception("work after a CNI call's answer failed")

    def _respond(self, request: HttpRequest) -> HttpResponse:
        try:
            return self._handler(request)
        except Exception as exc:
            log.exception("the CNI daemon failed to serve a request", path=request.path)
            return HttpResponse(500, f"capsa-cni-daemon failed: {exc}\n".encode(), "text/plain")

    def _read_request(self, connection: socket.socket) -> HttpRequest:
        received = b""
        while (end := received.find(b"\r\n\r\n")) < 0 and len(received) <= self._max_head:
            chunk = connection.recv(65536)
            if not chunk:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "the request ended within its head")
            received += chunk
        # Too long whether its end came or not.
        if not 0 <= end <= self._max_head:
            raise BadRequest(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request's head passes {self._max_head} bytes",
            )
        head, body = received[:end], received[end + 4 :]
        method, path, headers = _parse_head(head)
        if "transfer-encoding" in headers:
            raise BadRequest(
                HTTPStatus.NOT_IMPLEMENTED, "send the body with a Content-Length, not chunked"
            )
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            raise BadRequest(
                HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_text[:200]!r}"
            )
        # int() of thousands of digits is refused (and slow): a length that long is too large.
        length = int(length_text) if len(length_text) <= 20 else self._max_body + 1
        if length > self._max_body:
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"a body of {length_text[:40]} bytes passes the limit of {self._max_body}",
            )
        while len(body) < length:
            chunk = connection.recv(min(length - len(body), 1 << 20))
            if not chunk:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "the request ended within its body")
            body += chunk
        return HttpRequest(method, path, headers, body[:length], connection)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"invalid request line {request_line[:200]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"invalid header line {line[:200]!r}")
        headers[name.lower()] = value.strip(" \t")
    return parts[0], parts[1], headers


def _encode(response: HttpResponse) -> bytes:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    return (
        f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
    ).encode() + response.body


def _listening_socket(listen: tuple[str, int] | Path) -> socket.socket:
    if isinstance(listen, Path):
        listen.parent.mkdir(parents=True, exist_ok=True)
        # A socket left by a daemon that did not stop cleanly.
        if listen.is_socket():
            listen.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = str(listen)
    else:
        host, port = listen
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target = (host, port)
    try:
        sock.bind(target)
        if isinstance(listen, Path):
            # Whoever reaches the daemon can rewire pods' networks.
            listen.chmod(0o600)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock

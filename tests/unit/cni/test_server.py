"""ThreadedHttpServer through real sockets: unix sockets under tmp_path, and TCP on 127.0.0.1.

Every wait has a timeout, so that a bug fails a test instead of hanging it; the ``harness``
fixture releases whatever a handler may still wait on and stops every server it started.
"""

from __future__ import annotations

import logging
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from capsa.cni import server as server_module
from capsa.cni.server import HttpRequest, HttpResponse, ThreadedHttpServer

# How long a test waits for something that should happen (it normally takes milliseconds).
WAIT_S = 2.0
# How long a test watches for something that must not happen.
QUIET_S = 0.15
# The server's read and write timeouts in these tests (30 s in production): a connection left
# open by a failing test ends within this, so that stopping the server cannot hang the suite.
SERVER_TIMEOUT_S = 5.0

Address = tuple[str, int] | Path
Handler = Callable[[HttpRequest], HttpResponse]


@dataclass
class Answer:
    status: int
    reason: str
    # Names in lower case.
    headers: dict[str, str]
    body: bytes


class Harness:
    """Starts servers and hands out events; the fixture releases and stops them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[ThreadedHttpServer] = []
        self.events: list[threading.Event] = []
        self.thread_errors: list[BaseException | None] = []

    def start(
        self,
        handler: Handler,
        *,
        listen: Address | None = None,
        max_threads: int = 4,
        max_head: int = server_module.DEFAULT_MAX_HEAD,
        max_body: int = server_module.DEFAULT_MAX_BODY,
    ) -> ThreadedHttpServer:
        server = ThreadedHttpServer(
            self.tmp_path / "cni.sock" if listen is None else listen,
            handler,
            max_threads=max_threads,
            name="test-cni",
            max_head=max_head,
            max_body=max_body,
        )
        server.start()
        self.servers.append(server)
        return server

    def event(self) -> threading.Event:
        event = threading.Event()
        self.events.append(event)
        return event


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    monkeypatch.setattr(server_module, "READ_TIMEOUT_S", SERVER_TIMEOUT_S)
    monkeypatch.setattr(server_module, "WRITE_TIMEOUT_S", SERVER_TIMEOUT_S)
    harness = Harness(tmp_path)

    # An exception that escapes a serving thread kills it: record it to fail the test.
    def record_thread_error(args: threading.ExceptHookArgs) -> None:
        harness.thread_errors.append(args.exc_value)

    monkeypatch.setattr(threading, "excepthook", record_thread_error)
    try:
        yield harness
    finally:
        for event in harness.events:
            event.set()
        hung = [server for server in harness.servers if not stop_within(server, WAIT_S * 3)]
    assert not hung, "stop() did not return"
    assert not harness.thread_errors, f"a serving thread died: {harness.thread_errors!r}"


def stop_within(server: ThreadedHttpServer, timeout: float) -> bool:
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    stopper.join(timeout)
    return not stopper.is_alive()


# Clients.


def connect(address: Address) -> socket.socket:
    if isinstance(address, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = str(address)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = address
    sock.settimeout(WAIT_S)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def request_bytes(
    method: str = "POST",
    path: str = "/cni",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: capsa-cni-daemon"]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_answer(sock: socket.socket) -> Answer:
    """Reads up to the close (the server closes every connection) and checks the framing."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {raw!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(": ")
        assert colon, f"invalid header line {line!r}"
        headers[name.lower()] = value
    assert headers["content-length"] == str(len(body)), f"{raw!r} is not framed by its length"
    return Answer(int(status), reason, headers, body)


def exchange(address: Address, data: bytes) -> Answer:
    with connect(address) as sock:
        sock.sendall(data)
        return read_answer(sock)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


# Handlers.


@dataclass
class Recorder:
    """A handler that records its requests and answers each with ``response``."""

    response: HttpResponse = field(default_factory=lambda: HttpResponse(200, b'{"ok": true}'))
    requests: list[HttpRequest] = field(default_factory=list)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        return self.response


def assert_still_serves(address: Address, recorder: Recorder) -> None:
    before = len(recorder.requests)
    answer = exchange(address, request_bytes(path="/after", body=b"next"))
    assert answer.status == recorder.response.status
    assert [r.body for r in recorder.requests[before:]] == [b"next"]


# The exchange.


def test_post_with_body_reaches_the_handler_and_its_answer_comes_back(harness: Harness) -> None:
    recorder = Recorder(HttpResponse(201, b'{"cniVersion": "1.0.0"}'))
    server = harness.start(recorder)
    body = b'{"cniVersion": "1.0.0", "name": "capsa"}'
    data = request_bytes(
        path="/cni/add?x=1",
        body=body,
        headers={"X-Capsa-Command": "ADD", "Content-Type": "application/json", "X-Padded": "\t v "},
    )

    with connect(server.address) as sock:
        sock.sendall(data)
        answer = read_answer(sock)
        # The server closed its end: another read gets the end of the stream again.
        assert sock.recv(1) == b""

    [request] = recorder.requests
    assert (request.method, request.path, request.body) == ("POST", "/cni/add?x=1", body)
    assert request.headers == {
        "host": "capsa-cni-daemon",
        "content-length": str(len(body)),
        "x-capsa-command": "ADD",
        "content-type": "application/json",
        "x-padded": "v",
    }
    assert (answer.status, answer.reason) == (201, "Created")
    assert answer.headers == {
        "content-type": "application/json",
        "content-length": str(len(b'{"cniVersion": "1.0.0"}')),
        "connection": "close",
    }
    assert answer.body == b'{"cniVersion": "1.0.0"}'


def test_head_and_body_sent_in_several_writes_are_read_whole(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.start(recorder)
    body = b"0123456789" * 10
    data = request_bytes(body=body)
    head_end = data.index(b"\r\n\r\n")
    # Cut within the head, within the blank line that ends it, and twice within the body.
    cuts = [10, head_end + 3, head_end + 4 + 30, head_end + 4 + 70, len(data)]

    with connect(server.address) as sock:
        start = 0
        for cut in cuts:
            sock.sendall(data[start:cut])
            start = cut
            time.sleep(0.02)
        answer = read_answer(sock)

    assert answer.status == 200
    assert [r.body for r in recorder.requests] == [body]


def test_the_body_is_content_length_bytes_and_no_more(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.start(recorder)

    answer = exchange(server.address, request_bytes(body=b"abcdef") + b"EXTRA")

    assert answer.status == 200
    assert [r.body for r in recorder.requests] == [b"abcdef"]


def test_get_without_body(harness: Harness) -> None:
    recorder = Recorder(HttpResponse(200, b"pong\n", "text/plain"))
    server = harness.start(recorder)

    answer = exchange(server.address, request_bytes("GET", "/healthz"))

    [request] = recorder.requests
    assert (request.method, request.path, request.body) == ("GET", "/healthz", b"")
    assert "content-length" not in request.headers
    assert (answer.status, answer.headers["content-type"], answer.body) == (
        200,
        "text/plain",
        b"pong\n",
    )


def test_an_empty_answer_has_content_length_zero(harness: Harness) -> None:
    server = harness.start(Recorder(HttpResponse(204)))

    answer = exchange(server.address, request_bytes("GET", "/"))

    assert (answer.status, answer.reason, answer.body) == (204, "No Content", b"")
    assert answer.headers["content-length"] == "0"


def test_a_status_without_a_standard_reason_says_unknown(harness: Harness) -> None:
    server = harness.start(Recorder(HttpResponse(599, b"?")))

    answer = exchange(server.address, request_bytes("GET", "/"))

    assert (answer.status, answer.reason) == (599, "Unknown")


# Malformed requests: answered with an error in text, the handler never called, and the server
# (a single thread, so that one that died shows) serves the next connection.

MALFORMED = [
    pytest.param(b"GARBAGE\r\n\r\n", {400}, "invalid request line", id="request-line-one-word"),
    pytest.param(b"GET /\r\n\r\n", {400}, "invalid request line", id="request-line-no-version"),
    pytest.param(
        b"GET / SPDY/3\r\n\r\n", {400}, "invalid request line", id="request-line-not-http"
    ),
    pytest.param(b"\r\n\r\n", {400}, "invalid request line", id="empty-head"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost capsa\r\n\r\n", {400}, "invalid header line", id="no-colon"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost : capsa\r\n\r\n",
        {400},
        "invalid header line",
        id="space-before-colon",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n: capsa\r\n\r\n", {400}, "invalid header line", id="no-header-name"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        {400},
        "invalid Content-Length",
        id="content-length-not-a-number",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        {400},
        "invalid Content-Length",
        id="content-length-negative",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        {501},
        "chunked",
        id="chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n",
        {413},
        "passes the limit of 64",
        id="body-over-max-body",
    ),
    # str.isdigit() holds for "\xb2" (a superscript two, in latin-1), which int() refuses.
    pytest.param(
        b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
        {400},
        "Content-Length",
        id="content-length-superscript-digit",
    ),
    # More digits than int() converts (4300, since Python 3.11).
    pytest.param(
        b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        {400, 413},
        "",
        id="content-length-5000-digits",
    ),
]


@pytest.mark.parametrize(("data", "statuses", "reason"), MALFORMED)
def test_a_malformed_request_gets_an_error_and_never_reaches_the_handler(
    harness: Harness,
    data: bytes,
    statuses: set[int],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    server = harness.start(recorder, max_threads=1, max_body=64)

    with caplog.at_level(logging.WARNING, logger="capsa.cni.server"):
        answer = exchange(server.address, data)

    assert answer.status in statuses
    assert answer.headers["content-type"] == "text/plain"
    assert reason in answer.body.decode()
    assert answer.body.endswith(b"\n")
    assert recorder.requests == []
    # The operator sees it too, with the reason.
    refusals = [r for r in caplog.records if r.getMessage() == "refused a malformed request"]
    assert len(refusals) == 1
    assert_still_serves(server.address, recorder)


def test_a_head_that_grows_past_max_head_gets_431(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.start(recorder, max_threads=1, max_head=1024)
    # One byte past the limit, with no end of head: every byte sent is read.
    data = (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 1024)[:1025]

    answer = exchange(server.address, data)

    assert answer.status == 431
    assert b"1024" in answer.body
    assert recorder.requests == []
    assert_still_serves(server.address, recorder)


def test_a_whole_head_larger_than_max_head_gets_431(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.start(recorder, max_threads=1, max_head=1024)
    # Twice the limit, end of head included, in one write: one read takes it all.
    data = request_bytes("GET", "/", headers={"X-Long": "a" * 2048})

    answer = exchange(server.address, data)

    assert answer.status == 431, f"a head of {len(data)} bytes passed max_head=1024"
    assert recorder.requests == []


def test_a_body_at_max_body_is_accepted(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.start(recorder, max_body=64)

    answer = exchange(server.address, request_bytes(body=b"b" * 64))

    assert answer.status == 200
    assert [r.body for r in recorder.requests] == [b"b" * 64]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"POST /cni HTTP/1.1\r\nContent-Le", "within its head", id="within-head"),
        pytest.param(request_bytes(body=b"0123456789")[:-6], "within its body", id="within-body"),
    ],
)
def test_a_request_cut_short_by_a_half_close_gets_400(
    harness: Harness, data: bytes, reason: str
) -> None:
    recorder = Recorder()
    server = harness.start(recorder, max_threads=1)

    with connect(server.address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = read_answer(sock)

    assert answer.status == 400
    assert reason in answer.body.decode()
    assert recorder.requests == []
    assert_still_serves(server.address, recorder)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"POST /cni HTTP/1.1\r\nContent-Le", id="within-head"),
        pytest.param(request_bytes(body=b"0123456789")[:-6], id="within-body"),
    ],
)
def test_a_client_that_closes_in_the_middle_of_its_request_does_not_hurt_the_server(
    harness: Harness, data: bytes
) -> None:
    recorder = Recorder()
    server = harness.start(recorder, max_threads=1)

    for _ in range(3):
        with connect(server.address) as sock:
            sock.sendall(data)

    assert recorder.requests == []
    assert_still_serves(server.address, recorder)


def test_a_client_that_sends_nothing_is_dropped_after_the_read_timeout(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "READ_TIMEOUT_S", 0.2)
    recorder = Recorder()
    server = harness.start(recorder, max_threads=1)

    with connect(server.address) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.1 < time.monotonic() - started < 1.5

    assert recorder.requests == []
    assert_still_serves(server.address, recorder)


# The handler.


def test_a_handler_that_raises_gets_500_and_the_server_keeps_serving(harness: Harness) -> None:
    calls: list[str] = []

    def handler(request: HttpRequest) -> HttpResponse:
        calls.append(request.path)
        if request.path == "/boom":
            raise RuntimeError("the bridge is gone")
        return HttpResponse(200, b"{}")

    server = harness.start(handler, max_threads=1)

    answer = exchange(server.address, request_bytes(path="/boom"))
    assert answer.status == 500
    assert answer.headers["content-type"] == "text/plain"
    assert b"the bridge is gone" in answer.body

    assert exchange(server.address, request_bytes(path="/fine")).status == 200
    assert calls == ["/boom", "/fine"]


def test_the_handler_sees_the_client_gone_only_once_it_closed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short, so that a client_gone() that waits for the read timeout shows within the test.
    monkeypatch.setattr(server_module, "READ_TIMEOUT_S", 1.0)
    first_check: list[tuple[bool, float]] = []
    checked = harness.event()
    client_closed = harness.event()
    seen_gone = harness.event()

    def handler(request: HttpRequest) -> HttpResponse:
        started = time.monotonic()
        first_check.append((request.client_gone(), time.monotonic() - started))
        checked.set()
        if client_closed.wait(WAIT_S) and wait_until(request.client_gone):
            seen_gone.set()
        return HttpResponse(200, b"{}")

    server = harness.start(handler)
    sock = connect(server.address)
    try:
        sock.sendall(request_bytes(body=b"{}"))
        assert checked.wait(WAIT_S), "the handler's client_gone() did not return"
    finally:
        sock.close()
    client_closed.set()

    [(gone, took)] = first_check
    assert (gone, took < 0.1) == (False, True), (
        f"client_gone() returned {gone} after {took:.2f}s while the client waited"
    )
    assert seen_gone.wait(WAIT_S), "client_gone() stayed False after the client closed"


# The work after the answer.


def test_after_runs_once_the_client_has_the_whole_answer_and_the_close(harness: Harness) -> None:
    answer_read = harness.event()
    after_saw_answer_read: list[bool] = []
    after_done = harness.event()

    def after() -> None:
        after_saw_answer_read.append(answer_read.wait(WAIT_S))
        after_done.set()

    server = harness.start(lambda request: HttpResponse(200, b'{"done": 1}', after=after))

    # read_answer reads up to the close: the connection closed while after() still waits.
    answer = exchange(server.address, request_bytes(body=b"{}"))
    answer_read.set()

    assert answer.body == b'{"done": 1}'
    assert after_done.wait(WAIT_S), "after() did not run"
    assert after_saw_answer_read == [True]


def test_after_runs_on_the_serving_thread(harness: Harness) -> None:
    threads: list[tuple[str, str]] = []
    after_done = harness.event()

    def handler(request: HttpRequest) -> HttpResponse:
        handler_thread = threading.current_thread().name

        def after() -> None:
            threads.append((handler_thread, threading.current_thread().name))
            after_done.set()

        return HttpResponse(200, after=after)

    server = harness.start(handler)
    exchange(server.address, request_bytes())

    assert after_done.wait(WAIT_S)
    [(handler_thread, after_thread)] = threads
    assert handler_thread == after_thread
    assert handler_thread.startswith("test-cni-")


def test_after_still_runs_when_the_client_left_before_the_answer(harness: Harness) -> None:
    client_closed = harness.event()
    after_done = harness.event()

    def handler(request: HttpRequest) -> HttpResponse:
        client_closed.wait(WAIT_S)
        # Sending the answer fails: the client closed its socket.
        return HttpResponse(200, b"{}", after=after_done.set)

    server = harness.start(handler, max_threads=1)
    with connect(server.address) as sock:
        sock.sendall(request_bytes())
    client_closed.set()

    assert after_done.wait(WAIT_S), "after() did not run once the answer could not be sent"
    assert exchange(server.address, request_bytes()).status == 200


def test_an_after_that_raises_does_not_kill_the_thread(harness: Harness) -> None:
    afters: list[str] = []

    def handler(request: HttpRequest) -> HttpResponse:
        def after() -> None:
            afters.append(request.path)
            if request.path == "/boom":
                raise RuntimeError("the veth is busy")

        return HttpResponse(200, b"{}", after=after)

    server = harness.start(handler, max_threads=1)

    assert exchange(server.address, request_bytes(path="/boom")).status == 200
    assert exchange(server.address, request_bytes(path="/fine")).status == 200
    assert wait_until(lambda: afters == ["/boom", "/fine"]), afters


# Threads.


class BlockingHandler:
    """Holds each call (named by its body) until the test releases it."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.changed = threading.Condition()
        self.entered: list[str] = []
        self.in_handler = 0
        self.most_in_handler = 0
        self.releases: dict[str, threading.Event] = {}

    def release(self, name: str) -> threading.Event:
        with self.changed:
            if name not in self.releases:
                self.releases[name] = self.harness.event()
            return self.releases[name]

    def __call__(self, request: HttpRequest) -> HttpResponse:
        name = request.body.decode()
        release = self.release(name)
        with self.changed:
            self.entered.append(name)
            self.in_handler += 1
            self.most_in_handler = max(self.most_in_handler, self.in_handler)
            self.changed.notify_all()
        try:
            release.wait(WAIT_S)
        finally:
            with self.changed:
                self.in_handler -= 1
        return HttpResponse(200, name.encode())

    def wait_entered(self, *names: str, timeout: float = WAIT_S) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: set(names) <= set(self.entered), timeout)


def send_call(address: Address, name: str) -> socket.socket:
    sock = connect(address)
    sock.sendall(request_bytes(body=name.encode()))
    return sock


def test_threads_start_one_ahead_of_the_calls_and_stay(harness: Harness) -> None:
    handler = BlockingHandler(harness)
    server = harness.start(handler, max_threads=4)
    assert server.threads == 1

    with send_call(server.address, "a") as first:
        assert handler.wait_entered("a")
        assert server.threads == 2
        with send_call(server.address, "b") as second:
            assert handler.wait_entered("b")
            assert server.threads == 3
            handler.release("a").set()
            handler.release("b").set()
            assert read_answer(first).body == b"a"
            assert read_answer(second).body == b"b"

    # Idle threads wait in accept; the next call takes one of them, none is started. (A thread
    # is back in accept only after the work that follows its answer: the call waits for that.)
    assert wait_until(lambda: server.idle_threads == 3)
    handler.release("c").set()
    assert exchange(server.address, request_bytes(body=b"c")).body == b"c"
    assert server.threads == 3


def test_calls_run_at_once_up_to_max_threads_and_the_next_waits_in_the_backlog(
    harness: Harness,
) -> None:
    handler = BlockingHandler(harness)
    server = harness.start(handler, max_threads=3)
    clients = [send_call(server.address, name) for name in ("1", "2", "3")]
    try:
        assert handler.wait_entered("1", "2", "3"), handler.entered
        assert (handler.in_handler, server.threads) == (3, 3)

        # Accepted by the kernel, not by a thread: no fourth thread, no fourth call.
        clients.append(send_call(server.address, "4"))
        assert not handler.wait_entered("4", timeout=QUIET_S)
        assert server.threads == 3

        handler.release("2").set()
        assert read_answer(clients[1]).body == b"2"
        assert handler.wait_entered("4"), "the waiting call was not served once a thread freed"
        assert server.threads == 3

        for name in ("1", "3", "4"):
            handler.release(name).set()
        assert [read_answer(clients[i]).body for i in (0, 2, 3)] == [b"1", b"3", b"4"]
    finally:
        for client in clients:
            client.close()
    assert handler.most_in_handler == 3
    assert server.threads == 3


def test_max_threads_must_be_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_threads"):
        ThreadedHttpServer(tmp_path / "cni.sock", Recorder(), max_threads=0, name="test-cni")


# Stopping.


def test_stop_waits_for_the_call_in_progress_and_its_after_work(harness: Harness) -> None:
    entered = harness.event()
    release_handler = harness.event()
    release_after = harness.event()
    after_done = harness.event()
    after_done_when_stop_returned: list[bool] = []

    def after() -> None:
        release_after.wait(WAIT_S)
        after_done.set()

    def handler(request: HttpRequest) -> HttpResponse:
        entered.set()
        release_handler.wait(WAIT_S)
        return HttpResponse(200, b"{}", after=after)

    server = harness.start(handler)
    path = server.address
    assert isinstance(path, Path)
    stop_returned = threading.Event()

    def stop() -> None:
        server.stop()
        after_done_when_stop_returned.append(after_done.is_set())
        stop_returned.set()

    with connect(path) as client:
        client.sendall(request_bytes())
        assert entered.wait(WAIT_S)
        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        assert not stop_returned.wait(QUIET_S), "stop() returned during a call"
        # No longer accepting, even before the call ends.
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            connect(path).close()

        release_handler.set()
        assert read_answer(client).status == 200, "the call in progress lost its answer"
    assert not stop_returned.wait(QUIET_S), "stop() returned before the call's after work"

    release_after.set()
    assert stop_returned.wait(WAIT_S)
    stopper.join(WAIT_S)
    assert after_done_when_stop_returned == [True]
    assert not path.exists()
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        connect(path).close()


def test_stop_of_an_idle_server_is_quick_and_stop_twice_is_harmless(harness: Harness) -> None:
    server = harness.start(Recorder(), max_threads=2)
    path = server.address
    assert isinstance(path, Path)
    assert exchange(path, request_bytes()).status == 200

    started = time.monotonic()
    assert stop_within(server, WAIT_S)
    assert time.monotonic() - started < 0.5
    assert stop_within(server, WAIT_S)

    assert not path.exists()
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        connect(path).close()


def test_stop_of_a_server_never_started_is_harmless(tmp_path: Path) -> None:
    server = ThreadedHttpServer(tmp_path / "cni.sock", Recorder(), max_threads=1, name="test-cni")
    assert stop_within(server, WAIT_S)
    assert server.threads == 0


# Where it listens.


def test_the_unix_socket_is_private_and_its_directory_is_created(harness: Harness) -> None:
    path = harness.tmp_path / "run" / "capsa" / "cni.sock"
    server = harness.start(Recorder(), listen=path)

    assert server.address == path
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert exchange(path, request_bytes()).status == 200


def test_a_stale_socket_file_is_replaced(harness: Harness) -> None:
    path = harness.tmp_path / "cni.sock"
    # What a daemon that did not stop cleanly leaves: a socket file nobody listens on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    assert path.is_socket()
    with pytest.raises(ConnectionRefusedError):
        connect(path).close()

    server = harness.start(Recorder(), listen=path)

    assert exchange(server.address, request_bytes()).status == 200


def test_tcp_on_port_zero_gives_the_real_port(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.start(recorder, listen=("127.0.0.1", 0))

    address = server.address
    assert isinstance(address, tuple)
    host, port = address
    assert host == "127.0.0.1"
    assert port != 0

    answer = exchange(address, request_bytes(body=b"over tcp"))
    assert answer.status == 200
    assert [r.body for r in recorder.requests] == [b"over tcp"]

    assert stop_within(server, WAIT_S)
    with pytest.raises(ConnectionRefusedError):
        connect(address).close()


def test_start_raises_when_the_port_is_taken(harness: Harness) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ThreadedHttpServer(("127.0.0.1", port), Recorder(), max_threads=1, name="test-cni")
        with pytest.raises(OSError):
            server.start()
        assert server.threads == 0

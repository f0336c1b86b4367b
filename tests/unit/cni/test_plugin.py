from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from capsa.cni import plugin, protocol

ADD_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "a3f9c1d2e4b5",
    "CNI_NETNS": "/var/run/netns/cni-1234",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=pod-1",
    "CNI_PATH": "/opt/cni/bin",
}


class FakeDaemon:
    """A loopback HTTP server that records what capsa-cni sends and answers as told."""

    def __init__(self) -> None:
        # Each request: its path, its CNI variables (decoded from their headers) and its body.
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.body = b'{"cniVersion":"1.0.0","interfaces":[]}'
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                variables = {
                    variable: protocol.decode_header(self.headers[header])
                    for variable, header in protocol.ENVIRONMENT_HEADERS.items()
                    if header in self.headers
                }
                daemon.requests.append((self.path, variables, self.rfile.read(length)))
                self.send_response(daemon.status)
                self.send_header("Content-Length", str(len(daemon.body)))
                self.end_headers()
                self.wfile.write(daemon.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(timeout=5)


CONF = json.dumps({"cniVersion": "1.0.0", "name": "capsa", "type": "capsa-cni"}).encode()


def call(
    env: dict[str, str], address: str, stdin: bytes = CONF, timeout: float = 5.0
) -> tuple[int, bytes]:
    return plugin.run(env, stdin, address, timeout)


def error_of(status: int, output: bytes) -> dict[str, Any]:
    assert status != 0
    error: dict[str, Any] = json.loads(output)
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    return error


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_version_echoes_the_runtime_version() -> None:
    status, output = call({"CNI_COMMAND": "VERSION"}, "127.0.0.1:1", b'{"cniVersion":"0.4.0"}')
    assert status == 0
    assert json.loads(output) == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_version_without_stdin() -> None:
    status, output = call({"CNI_COMMAND": "VERSION"}, "127.0.0.1:1", b"")
    assert status == 0
    assert json.loads(output)["cniVersion"] == "1.0.0"


def test_plugin_and_daemon_agree() -> None:
    # The plugin is installed alone and cannot import capsa: its copies must not drift.
    assert plugin.SUPPORTED_VERSIONS == protocol.SUPPORTED_VERSIONS
    assert plugin.REQUIRED_ENVIRONMENT == protocol.REQUIRED_ENVIRONMENT
    assert plugin.ENVIRONMENT_HEADERS == protocol.ENVIRONMENT_HEADERS
    assert plugin.DEFAULT_VERSION == protocol.DEFAULT_VERSION
    assert plugin.INVALID_ENVIRONMENT == protocol.ErrorCode.INVALID_ENVIRONMENT
    assert plugin.TRY_AGAIN_LATER == protocol.ErrorCode.TRY_AGAIN_LATER
    assert plugin.PLUGIN_NOT_AVAILABLE == protocol.ErrorCode.PLUGIN_NOT_AVAILABLE
    assert plugin.INTERNAL == protocol.ErrorCode.INTERNAL


@pytest.mark.parametrize(
    ("command", "variable"),
    [(c, v) for c, variables in plugin.REQUIRED_ENVIRONMENT.items() for v in variables],
)
def test_missing_environment_is_code_4(daemon: FakeDaemon, command: str, variable: str) -> None:
    env = {**ADD_ENV, "CNI_COMMAND": command}
    del env[variable]
    error = error_of(*call(env, daemon.address))
    assert error["code"] == 4
    assert variable in error["msg"]
    assert daemon.requests == []


@pytest.mark.parametrize("command", ["", "add", "UPDATE"])
def test_unsupported_command_is_code_4(command: str) -> None:
    error = error_of(*call({**ADD_ENV, "CNI_COMMAND": command}, "127.0.0.1:1"))
    assert error["code"] == 4
    assert "CNI_COMMAND" in error["msg"]


@pytest.mark.parametrize("stdin", [CONF, b"", b'{"cniVersion": "1.0.0",', b"\xff\xfe{}"])
def test_the_config_goes_to_the_daemon_unread(daemon: FakeDaemon, stdin: bytes) -> None:
    # The daemon checks it (and answers code 6 for what is no JSON object).
    call(ADD_ENV, daemon.address, stdin)
    ((_, _, body),) = daemon.requests
    assert body == stdin


def test_the_plugins_own_errors_carry_the_config_version() -> None:
    stdin = json.dumps({"cniVersion": "0.4.0"}).encode()
    assert error_of(*call(ADD_ENV, f"127.0.0.1:{closed_port()}", stdin))["cniVersion"] == "0.4.0"
    assert error_of(*call(ADD_ENV, f"127.0.0.1:{closed_port()}", b"{"))["cniVersion"] == "1.0.0"


def test_add_is_forwarded_and_the_result_printed(daemon: FakeDaemon) -> None:
    status, output = call(ADD_ENV, daemon.address)
    assert (status, output) == (0, daemon.body)
    ((path, variables, body),) = daemon.requests
    assert path == "/cni/add"
    assert variables == {name: value for name, value in ADD_ENV.items() if name != "CNI_COMMAND"}
    assert body == CONF


@pytest.mark.parametrize(
    "value",
    [
        "/var/run/netns/cni 1",
        "K8S_POD_NAME=caf\u00e9;X=100%",
        "tab\there\r\nnewline",
        "not-utf-8-\udcff",
        " leading and trailing ",
    ],
)
def test_any_variable_reaches_the_daemon_as_the_runtime_set_it(
    daemon: FakeDaemon, value: str
) -> None:
    call({**ADD_ENV, "CNI_NETNS": value}, daemon.address)
    ((_, variables, _),) = daemon.requests
    assert variables["CNI_NETNS"] == value


def test_del_with_empty_netns_is_forwarded(daemon: FakeDaemon) -> None:
    daemon.body = b""
    env = {**ADD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}
    assert call(env, daemon.address) == (0, b"")
    ((path, variables, _),) = daemon.requests
    assert path == "/cni/del"
    assert "CNI_NETNS" not in variables


def test_daemon_errors_are_printed_as_they_came(daemon: FakeDaemon) -> None:
    daemon.status = 404
    daemon.body = b'{"cniVersion":"1.0.0","code":3,"msg":"capsule pod-1 has no port","details":""}'
    assert call(ADD_ENV, daemon.address) == (1, daemon.body)


def test_non_cni_daemon_errors_are_wrapped(daemon: FakeDaemon) -> None:
    daemon.status = 500
    daemon.body = b"<html>Internal Server Error</html>"
    error = error_of(*call(ADD_ENV, daemon.address))
    assert error["code"] == 999
    assert "HTTP 500" in error["msg"]
    assert "Internal Server Error" in error["details"]


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_are_forwarded_without_an_attachment(
    daemon: FakeDaemon, command: str
) -> None:
    daemon.body = b""
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"}
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "capsa"}).encode()
    assert call(env, daemon.address, stdin) == (0, b"")
    ((path, variables, body),) = daemon.requests
    assert path == f"/cni/{command.lower()}"
    assert body == stdin
    assert variables == {"CNI_PATH": "/opt/cni/bin"}


def test_unreachable_daemon_is_code_11_and_says_how_to_fix() -> None:
    address = f"127.0.0.1:{closed_port()}"
    error = error_of(*call(ADD_ENV, address))
    assert error["code"] == 11
    assert address in error["msg"]
    assert "capsa up" in error["details"]


@pytest.mark.parametrize("address", ["", "no-port", "127.0.0.1:http"])
def test_an_unusable_daemon_address_is_code_999(address: str) -> None:
    error = error_of(*call(ADD_ENV, address))
    assert error["code"] == 999
    assert "capsa up" in error["details"]


def test_daemon_that_hangs_up_without_answering_is_code_11() -> None:
    # What a daemon killed in the middle of a call looks like to the plugin.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def hang_up() -> None:
            connection, _ = listener.accept()
            connection.recv(65536)
            connection.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        error = error_of(*call(ADD_ENV, address))
        thread.join(timeout=5)
    assert error["code"] == 11
    assert "closed the connection without answering" in error["msg"]


class RawDaemon:
    """A loopback server that writes ``pieces`` as its answer, one send each, and closes the
    connection only when ``close`` is set (or at once with ``close_at_once``)."""

    def __init__(self, pieces: list[bytes], *, close_at_once: bool = False) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.close = threading.Event()
        if close_at_once:
            self.close.set()
        self.thread = threading.Thread(target=self._answer, args=(pieces,))
        self.thread.start()

    def _answer(self, pieces: list[bytes]) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            for piece in pieces:
                connection.sendall(piece)
            self.close.wait(timeout=10)

    def stop(self) -> None:
        self.close.set()
        self.thread.join(timeout=5)
        self.listener.close()


def answer_head(length: int | None) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    return head + b"\r\n"


RESULT = b'{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}]}'


def add_answered_by(pieces: list[bytes], *, close_at_once: bool = False) -> tuple[int, bytes]:
    """An ADD against a RawDaemon that answers ``pieces``."""
    daemon = RawDaemon(pieces, close_at_once=close_at_once)
    try:
        return call(ADD_ENV, daemon.address, timeout=3)
    finally:
        daemon.stop()


def test_the_answer_is_taken_once_whole_without_waiting_for_the_close() -> None:
    # The daemon closes a connection turns of its event loop after answering: the plugin must
    # not wait for that. Here the close only comes after the plugin returned, so a plugin that
    # read to the close would time out with code 11.
    head = answer_head(len(RESULT))
    assert add_answered_by([head[:9], head[9:] + RESULT[:10], RESULT[10:]]) == (0, RESULT)


def test_an_answer_without_content_length_is_read_to_the_close() -> None:
    assert add_answered_by([answer_head(None), RESULT], close_at_once=True) == (0, RESULT)


def test_an_answer_cut_short_by_the_close_is_code_11() -> None:
    cut_short = [answer_head(len(RESULT)), RESULT[:10]]
    error = error_of(*add_answered_by(cut_short, close_at_once=True))
    assert error["code"] == 11
    assert "in the middle of its answer" in error["msg"]


def test_status_of_an_unreachable_daemon_is_code_50() -> None:
    # STATUS tells the runtime the plugin cannot serve ADD; 11 would mean "retry this call".
    address = f"127.0.0.1:{closed_port()}"
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "capsa"}).encode()
    error = error_of(*call({"CNI_COMMAND": "STATUS"}, address, stdin))
    assert error["code"] == 50
    assert address in error["msg"]


def test_missing_unix_socket_is_code_11(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'cni.sock'}"
    error = error_of(*call(ADD_ENV, address))
    assert error["code"] == 11
    assert address in error["msg"]


def test_silent_daemon_times_out_with_code_11() -> None:
    # Connections wait in the backlog of a socket that never accepts.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        error = error_of(*call(ADD_ENV, address, timeout=0.2))
    assert error["code"] == 11
    assert "did not answer within 0.2s" in error["msg"]


class FakeStdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


def test_main_reads_the_process_environment_and_stdin(
    monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    environ = {k.encode(): v.encode() for k, v in ADD_ENV.items() if k != "CNI_NETNS"}
    monkeypatch.setattr("posix.environ", {**environ, b"HOME": b"/root"})
    monkeypatch.setattr("sys.stdin", FakeStdin(CONF))
    assert plugin.main("127.0.0.1:1", 5.0) == 1
    output = capsysbinary.readouterr().out
    assert output.endswith(b"\n")
    error = json.loads(output)
    assert (error["code"], error["msg"]) == (
        4,
        "ADD needs CNI_NETNS, which the runtime did not set",
    )


@pytest.mark.parametrize(
    "text", ['{"a": [1, 2.5, null, true, false], "b": "\\u00e9"}', ' {"x": {}} ', "-1e3", '"s"']
)
def test_decode_json_matches_json(text: str) -> None:
    assert plugin.decode_json(text) == json.loads(text)


def imports_of(env: dict[str, str], stdin: bytes, code: str = "pass") -> set[str]:
    """The modules that ``code`` imports in a ``python -I -S`` process, beyond start-up's."""

    def imported(snippet: str) -> set[str]:
        run = subprocess.run(
            [sys.executable, "-I", "-S", "-X", "importtime", "-c", snippet],
            env=env,
            input=stdin,
            capture_output=True,
            timeout=30,
            check=True,
        )
        lines = run.stderr.decode().splitlines()
        return {line.rsplit("|", 1)[1].strip() for line in lines if "|" in line}

    return imported(code) - imported("pass")


def run_plugin_code(address: str) -> str:
    """Code that runs plugin.py as its launcher does, for the daemon at ``address``."""
    directory = str(Path(plugin.__file__).parent)
    return (
        f"import sys; sys.path.insert(0, {directory!r}); import plugin; "
        f"plugin.run_as_process({address!r}, 5.0)"
    )


def test_add_and_del_import_only_socket(daemon: FakeDaemon) -> None:
    # Start-up time is the plugin's cost: it must not import json, socket, re, enum or os, and
    # not even _json on the way to the daemon.
    env = {**ADD_ENV, "CNI_COMMAND": "DEL"}
    assert imports_of(env, CONF, run_plugin_code(daemon.address)) == {"plugin", "_socket"}
    assert len(daemon.requests) == 1


def test_version_imports_only_builtin_modules() -> None:
    env = {"CNI_COMMAND": "VERSION"}
    imported = imports_of(env, CONF, run_plugin_code("127.0.0.1:1"))
    assert imported <= {"plugin", "_json", "_socket"}, imported

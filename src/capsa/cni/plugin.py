"""capsa-cni: the CNI plugin executable, a thin client of capsa-cni-daemon.

containerd runs it for every sandbox with the CNI environment (CNI_COMMAND, CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH) and the network config on stdin. It answers VERSION
itself; for ADD, DEL, CHECK, GC and STATUS it checks that the runtime set the variables the command
needs and forwards one ``POST /cni/<command>`` to its daemon: the variables as headers, stdin
unread as the body (see capsa.cni.protocol). The daemon checks the config. Its answer goes to
stdout; failures are CNI error objects on stdout with exit status 1. A daemon out of reach is "try
again later" (11), or for STATUS "plugin not available" (50). The daemon's address ("HOST:PORT" or
"unix:/path") and how long to wait for it come from the launcher, which ``capsa up`` writes from
capsa's configuration (capsa.cni.install).

This file is installed on its own (see capsa.cni.install) and runs as ``python3 -I -S``: it
imports no capsa module and nothing beyond a few built-in modules, because interpreter start-up and
imports are most of its run time. ``socket`` would cost about 10 ms more per call (it pulls in
``enum`` and ``os``), so it uses its C half ``_socket`` directly, and ``posix`` (already loaded at
start-up) rather than ``os``. Only VERSION and failures read the config (for its ``cniVersion``),
with ``_json``: a shared library, whose loading would cost ADD and DEL about 0.2 ms.
"""

import _socket
import posix
import sys
import time

# Keep in step with capsa.cni.protocol (a unit test compares them).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_VERSION = "1.0.0"
REQUIRED_ENVIRONMENT = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
}
ENVIRONMENT_HEADERS = {
    "CNI_CONTAINERID": "CNI-Container-Id",
    "CNI_NETNS": "CNI-Netns",
    "CNI_IFNAME": "CNI-Ifname",
    "CNI_ARGS": "CNI-Args",
    "CNI_PATH": "CNI-Path",
}
INVALID_ENVIRONMENT = 4
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
INTERNAL = 999
# Answers bigger than this are not a CNI result.
MAX_RESPONSE_BYTES = 1 << 20
# Bytes that a header value carries as they are; the others are percent-encoded.
_HEADER_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}
_FIX_HINT = (
    "is capsa running on this host (`capsa up`)? capsa-cni reaches the daemon at the address "
    "`capsa up` wrote into it: the daemon's cni.daemon_listen (CAPSA_CNI_DAEMON_LISTEN)"
)


class PluginError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class _JsonContext:
    """The settings json.loads hands to the C scanner by default."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def decode_json(text: str) -> object:
    """json.loads without importing json, for valid input. Raises ValueError on invalid input."""
    import _json

    # typeshed types the context as a scanner; the C code only reads the attributes above.
    scan = _json.make_scanner(_JsonContext)  # type: ignore[arg-type]
    stripped = text.strip(" \t\r\n")
    try:
        value, end = scan(stripped, 0)
        if end == len(stripped):
            return value
    except (StopIteration, ValueError, SystemError):
        pass
    # Invalid input only: json says what is wrong. (Python 3.11's C scanner cannot raise its own
    # error until json.decoder is imported: it fails with a SystemError instead.)
    import json

    return json.loads(text)


def _quote(text: str) -> str:
    """``text`` as a JSON string."""
    import _json

    return _json.encode_basestring_ascii(text)


def run(environ: dict[str, str], stdin: bytes, daemon: str, timeout: float) -> tuple[int, bytes]:
    """One plugin call for the daemon at ``daemon``: the exit status and what goes to stdout."""
    command = environ.get("CNI_COMMAND", "")
    try:
        if command == "VERSION":
            return 0, _version_answer(stdin)
        if command not in REQUIRED_ENVIRONMENT:
            raise PluginError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND {command!r} is not supported by capsa-cni",
                "supported commands: VERSION, " + ", ".join(REQUIRED_ENVIRONMENT),
            )
        missing = [name for name in REQUIRED_ENVIRONMENT[command] if not environ.get(name)]
        if missing:
            raise PluginError(
                INVALID_ENVIRONMENT,
                f"{command} needs {', '.join(missing)}, which the runtime did not set",
            )
        headers = "".join(
            f"{header}: {_header_value(environ[variable])}\r\n"
            for variable, header in ENVIRONMENT_HEADERS.items()
            if environ.get(variable)
        )
        try:
            status, answer = _post(daemon, "/cni/" + command.lower(), headers, stdin, timeout)
        except PluginError as exc:
            if command == "STATUS" and exc.code == TRY_AGAIN_LATER:
                # STATUS has its own code for "cannot serve ADD now".
                exc.code = PLUGIN_NOT_AVAILABLE
            raise
        return _daemon_answer(daemon, status, answer)
    except PluginError as exc:
        error = _json_object(
            cniVersion=_quote(_config_version(stdin)),
            code=str(exc.code),
            msg=_quote(exc.msg),
            details=_quote(exc.details),
        )
        return 1, error.encode()


def _config_version(stdin: bytes) -> str:
    """The ``cniVersion`` that the config on stdin names, if it is a JSON object that names one."""
    try:
        config = decode_json(stdin.decode("utf-8")) if stdin.strip() else None
    except ValueError:
        config = None
    version = config.get("cniVersion") if isinstance(config, dict) else None
    return version if isinstance(version, str) else DEFAULT_VERSION


def _version_answer(stdin: bytes) -> bytes:
    # The runtime's version is echoed when stdin names one; VERSION needs nothing else.
    versions = "[" + ",".join(_quote(v) for v in SUPPORTED_VERSIONS) + "]"
    return _json_object(
        cniVersion=_quote(_config_version(stdin)), supportedVersions=versions
    ).encode()


def _json_object(**members: str) -> str:
    """A JSON object from members that are JSON already."""
    return "{" + ",".join(_quote(name) + ":" + value for name, value in members.items()) + "}"


def _header_value(value: str) -> str:
    """A variable as a header value: printable ASCII as it is, other bytes percent-encoded."""
    if value.isascii() and value.isprintable() and " " not in value and "%" not in value:
        return value
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _HEADER_SAFE else f"%{b:02X}" for b in raw)


def _connect(address: str, deadline: float) -> _socket.socket:
    if address.startswith("unix:"):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        target: str | tuple[str, int] = address[len("unix:") :]
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise PluginError(
                INTERNAL,
                f"capsa-cni has an invalid daemon address {address!r}",
                'expected "HOST:PORT" or "unix:/path"; `capsa up` writes it again',
            )
        host = host.strip("[]")
        family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = _socket.socket(family, _socket.SOCK_STREAM)
        target = (host, int(port))
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def _post(address: str, path: str, headers: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 POST (the daemon answers with Content-Length and closes)."""
    deadline = time.monotonic() + timeout
    request = (
        f"POST {path} HTTP/1.1\r\nHost: capsa-cni-daemon\r\nContent-Type: application/json\r\n"
        f"{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    try:
        sock = _connect(address, deadline)
        try:
            sock.sendall(request)
            raw = _receive(sock, address, deadline)
        finally:
            sock.close()
    except TimeoutError:
        raise PluginError(
            TRY_AGAIN_LATER,
            f"capsa-cni-daemon at {address} did not answer within {timeout:g}s",
            "the daemon may be overloaded or stuck; " + _FIX_HINT,
        ) from None
    except OSError as exc:
        raise PluginError(
            TRY_AGAIN_LATER,
            f"cannot reach capsa-cni-daemon at {address}: {exc.strerror or exc}",
            _FIX_HINT,
        ) from None
    return _parse_response(address, raw)


def _receive(sock: _socket.socket, address: str, deadline: float) -> bytes:
    """The daemon's answer: up to its Content-Length, or else up to the close.

    The answer is whole before the daemon closes the connection, which it does a turn or more
    of its event loop later, after the work that the ADD's or DEL's write woke (about 5 ms).
    """
    received = b""
    size = None
    while size is None or len(received) < size:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(65536)
        if not chunk:
            if size is not None:
                raise PluginError(
                    TRY_AGAIN_LATER,
                    f"capsa-cni-daemon at {address} closed the connection in the middle of "
                    "its answer",
                    "the daemon stopped or restarted during the call; " + _FIX_HINT,
                )
            break
        received += chunk
        if len(received) > MAX_RESPONSE_BYTES:
            raise PluginError(INTERNAL, f"capsa-cni-daemon at {address} sent an oversized answer")
        if size is None:
            size = _answer_size(received)
    return received


def _answer_size(received: bytes) -> int | None:
    """The whole answer's size in bytes, once its head is in and gives a Content-Length."""
    head, sep, _ = received.partition(b"\r\n\r\n")
    length = _content_length(head) if sep else None
    return None if length is None else len(head) + len(sep) + length


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def _parse_response(address: str, raw: bytes) -> tuple[int, bytes]:
    if not raw:
        raise PluginError(
            TRY_AGAIN_LATER,
            f"capsa-cni-daemon at {address} closed the connection without answering",
            "the daemon stopped or restarted during the call; " + _FIX_HINT,
        )
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        raise PluginError(
            INTERNAL,
            f"capsa-cni-daemon at {address} sent a malformed HTTP answer",
            repr(raw[:200]),
        )
    length = _content_length(head)
    return int(status_line[1]), body if length is None else body[:length]


def _daemon_answer(address: str, status: int, body: bytes) -> tuple[int, bytes]:
    if 200 <= status < 300:
        return 0, body
    # The daemon reports failures as CNI error objects; anything else is wrapped into one.
    try:
        error = decode_json(body.decode("utf-8"))
    except ValueError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("code"), int):
        return 1, body
    raise PluginError(
        INTERNAL,
        f"capsa-cni-daemon at {address} answered HTTP {status} without a CNI error",
        body[:500].decode("utf-8", "replace"),
    )


def main(daemon: str, timeout: float) -> int:
    # The CNI variables only; undecodable bytes survive as os.environ would keep them.
    environ = {
        key.decode(): value.decode("utf-8", "surrogateescape")
        for key, value in posix.environ.items()
        if key.startswith(b"CNI_")
    }
    # The runtime always writes the config and closes stdin; a terminal means someone typing.
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    status, output = run(environ, stdin, daemon, timeout)
    if output:
        sys.stdout.buffer.write(output + b"\n")
        sys.stdout.buffer.flush()
    return status


def run_as_process(daemon: str, timeout: float) -> None:
    """:func:`main` as the whole process: its answer is written and flushed, so the interpreter's
    clean-up at exit (about 2 ms of a 9 ms run here) has nothing left to do, and is skipped."""
    posix._exit(main(daemon, timeout))

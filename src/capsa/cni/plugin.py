"""capsa-cni: the CNI plugin executable, a thin client of capsa-cni-daemon.

containerd runs it for every sandbox with the CNI environment (CNI_COMMAND, CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH) and the network config on stdin. It answers VERSION
itself; for ADD, DEL, CHECK, GC and STATUS it checks the environment the command needs, checks that
stdin is a JSON object, and forwards one ``POST /cni/<command>`` to the daemon named by the
config's ``daemon`` key ("127.0.0.1:PORT" or "unix:/path"), waiting at most ``timeout`` seconds.
The daemon checks the rest. Its answer goes to stdout; failures are CNI error objects on stdout
with exit status 1. A daemon out of reach is "try again later" (11), or for STATUS "plugin not
available" (50).

This file is installed on its own (see capsa.cni.install) and runs as ``python3 -I -S``: it
imports no capsa module and nothing beyond a few built-in modules, because interpreter start-up and
imports are most of its run time. ``json`` and ``socket`` would cost about 10 ms more per call
(they pull in ``re`` and ``enum``), so it uses their C halves ``_json`` and ``_socket`` directly,
and ``posix`` (already loaded at start-up) rather than ``os``.
"""

import _json
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
INVALID_ENVIRONMENT = 4
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
INTERNAL = 999
DEFAULT_TIMEOUT = 60.0
# Answers bigger than this are not a CNI result.
MAX_RESPONSE_BYTES = 1 << 20
_FIX_HINT = (
    "is capsa running on this host (`capsa up`)? The conflist's `daemon` must match the "
    "daemon's cni.daemon_listen (CAPSA_CNI_DAEMON_LISTEN)"
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


# typeshed types the context as a scanner; the C code only reads the attributes above.
_scan_json = _json.make_scanner(_JsonContext)  # type: ignore[arg-type]
_quote = _json.encode_basestring_ascii


def decode_json(text: str) -> object:
    """json.loads without importing json, for valid input. Raises ValueError on invalid input."""
    stripped = text.strip(" \t\r\n")
    try:
        value, end = _scan_json(stripped, 0)
        if end == len(stripped):
            return value
    except (StopIteration, ValueError, SystemError):
        pass
    # Invalid input only: json says what is wrong. (Python 3.11's C scanner cannot raise its own
    # error until json.decoder is imported: it fails with a SystemError instead.)
    import json

    return json.loads(text)


def run(environ: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    """One plugin call: the exit status and what goes to stdout."""
    command = environ.get("CNI_COMMAND", "")
    version = DEFAULT_VERSION
    try:
        if command == "VERSION":
            return 0, _version_answer(stdin)
        if command not in REQUIRED_ENVIRONMENT:
            raise PluginError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND {command!r} is not supported by capsa-cni",
                "supported commands: VERSION, " + ", ".join(REQUIRED_ENVIRONMENT),
            )
        try:
            text = stdin.decode("utf-8")
            config = decode_json(text)
        except ValueError as exc:
            raise PluginError(
                DECODING_FAILURE, "the network config on stdin is not valid JSON", str(exc)
            ) from None
        if not isinstance(config, dict):
            raise PluginError(DECODING_FAILURE, "the network config on stdin is not a JSON object")
        if isinstance(config.get("cniVersion"), str):
            version = config["cniVersion"]
        missing = [name for name in REQUIRED_ENVIRONMENT[command] if not environ.get(name)]
        if missing:
            raise PluginError(
                INVALID_ENVIRONMENT,
                f"{command} needs {', '.join(missing)}, which the runtime did not set",
            )
        address, timeout = _daemon_settings(config)
        body = _envelope(environ, text)
        try:
            status, answer = _post(address, "/cni/" + command.lower(), body, timeout)
        except PluginError as exc:
            if command == "STATUS" and exc.code == TRY_AGAIN_LATER:
                # STATUS has its own code for "cannot serve ADD now".
                exc.code = PLUGIN_NOT_AVAILABLE
            raise
        return _daemon_answer(address, status, answer)
    except PluginError as exc:
        error = _json_object(
            cniVersion=_quote(version),
            code=str(exc.code),
            msg=_quote(exc.msg),
            details=_quote(exc.details),
        )
        return 1, error.encode()


def _version_answer(stdin: bytes) -> bytes:
    # The runtime's version is echoed when stdin names one; VERSION needs nothing else.
    try:
        config = decode_json(stdin.decode("utf-8")) if stdin.strip() else None
    except ValueError:
        config = None
    version = config.get("cniVersion") if isinstance(config, dict) else None
    if not isinstance(version, str):
        version = DEFAULT_VERSION
    versions = "[" + ",".join(_quote(v) for v in SUPPORTED_VERSIONS) + "]"
    return _json_object(cniVersion=_quote(version), supportedVersions=versions).encode()


def _daemon_settings(config: dict[str, object]) -> tuple[str, float]:
    address = config.get("daemon")
    if not isinstance(address, str) or not address:
        raise PluginError(
            INVALID_NETWORK_CONFIG,
            "the capsa-cni plugin config has no `daemon` address",
            'set `daemon` to the daemon\'s cni.daemon_listen, e.g. "127.0.0.1:9519" or '
            '"unix:/run/capsa/cni.sock" (capsa writes it when it installs the conflist)',
        )
    timeout = config.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise PluginError(
            INVALID_NETWORK_CONFIG,
            f"the capsa-cni plugin config has an invalid `timeout` {timeout!r}",
            "expected a positive number of seconds",
        )
    return address, float(timeout)


def _json_object(**members: str) -> str:
    """A JSON object from members that are JSON already."""
    return "{" + ",".join(_quote(name) + ":" + value for name, value in members.items()) + "}"


def _envelope(environ: dict[str, str], config: str) -> bytes:
    # The config was checked to be one JSON object, so it is embedded as it came.
    return _json_object(
        containerId=_quote(environ.get("CNI_CONTAINERID", "")),
        netns=_quote(environ.get("CNI_NETNS", "")),
        ifname=_quote(environ.get("CNI_IFNAME", "")),
        args=_quote(environ.get("CNI_ARGS", "")),
        path=_quote(environ.get("CNI_PATH", "")),
        config=config.strip(),
    ).encode()


def _connect(address: str, deadline: float) -> _socket.socket:
    if address.startswith("unix:"):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        target: str | tuple[str, int] = address[len("unix:") :]
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise PluginError(
                INVALID_NETWORK_CONFIG,
                f"the capsa-cni plugin config has an invalid `daemon` address {address!r}",
                'expected "HOST:PORT" or "unix:/path"',
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


def _post(address: str, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 POST (the daemon answers with Content-Length and closes)."""
    deadline = time.monotonic() + timeout
    request = (
        f"POST {path} HTTP/1.1\r\nHost: capsa-cni-daemon\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
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


def main() -> int:
    # The CNI variables only; undecodable bytes survive as os.environ would keep them.
    environ = {
        key.decode(): value.decode("utf-8", "surrogateescape")
        for key, value in posix.environ.items()
        if key.startswith(b"CNI_")
    }
    # The runtime always writes the config and closes stdin; a terminal means someone typing.
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    status, output = run(environ, stdin)
    if output:
        sys.stdout.buffer.write(output + b"\n")
        sys.stdout.buffer.flush()
    return status


def run_as_process() -> None:
    """:func:`main` as the whole process: its answer is written and flushed, so the interpreter's
    clean-up at exit (about 2 ms of a 9 ms run here) has nothing left to do, and is skipped."""
    posix._exit(main())


if __name__ == "__main__":
    run_as_process()

"""The CNI protocol as the daemon sees it: requests forwarded by ``capsa-cni``, errors, results.

``capsa-cni`` forwards each call as ``POST /cni/<command>``: the network config from its stdin,
as it came, is the body, and each CNI variable is a header (:data:`ENVIRONMENT_HEADERS`), its
value's UTF-8 bytes percent-encoded but for printable ASCII (:func:`decode_header`).

:func:`parse_config` and :func:`parse_request` check a call against the spec (SPEC.md 1.1.0,
sections 1, 2 and 5) and return a :class:`CniRequest`; :class:`CniError` carries a spec error
code; :func:`build_result` renders what was plugged (every interface of the pod) in the conf's
``cniVersion``, appended to ``prevResult``; :func:`prev_result_problems` says where a CHECK's
``prevResult`` disagrees with the port. Nothing here touches the kernel or the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import unquote

from capsa.network.types import PluggedPort, PortBinding

# Versions whose ADD result build_result can render; capsa-cni reports the same from VERSION.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# What an error says when the request's own version is unknown or unsupported.
DEFAULT_VERSION = "1.0.0"
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS")
# The environment each command needs (SPEC.md, section 2); the rest is optional.
REQUIRED_ENVIRONMENT = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
}
# The spec version that introduced each command that not every version has.
FIRST_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
# The commands about one attachment (container id, ifname).
ATTACHMENT_COMMANDS = ("ADD", "DEL", "CHECK")
# runtimeConfig keys that capsa accepts: the capabilities its conflist declares. Any other one
# asks for something capsa would silently not do.
ACCEPTED_RUNTIME_CONFIG = frozenset({"portMappings"})
# Keys that would change what ADD does but that capsa does not implement (it is its own IPAM).
UNSUPPORTED_KEYS = ("ipam",)
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"
# libcni also sends the key under the spec's first, mistaken name (containernetworking/cni#1101).
LEGACY_ATTACHMENTS_KEY = "cni.dev/attachments"
# The request header that carries each variable (capsa-cni keeps a copy: a test compares them).
ENVIRONMENT_HEADERS = {
    "CNI_CONTAINERID": "CNI-Container-Id",
    "CNI_NETNS": "CNI-Netns",
    "CNI_IFNAME": "CNI-Ifname",
    "CNI_ARGS": "CNI-Args",
    "CNI_PATH": "CNI-Path",
}
# Linux interface names: at most IFNAMSIZ - 1 bytes, no slash, colon or whitespace.
_IFNAME_MAX = 15


class ErrorCode(IntEnum):
    """The well-known CNI error codes (SPEC.md, section 5); 100 and up are plugin-specific."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODING_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50
    LIMITED_CONNECTIVITY = 51
    # What libcni uses for failures the other codes do not describe.
    INTERNAL = 999


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "code": int(self.code),
            "msg": self.msg,
            "details": self.details,
        }


@dataclass(frozen=True)
class CniRequest:
    command: str
    # Empty for GC and STATUS, which concern no attachment.
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    cni_version: str
    network_name: str
    # The plugin's network config as the runtime passed it on stdin (name, type, prevResult, ...).
    network_config: dict[str, Any]
    # GC only: the (container id, ifname) of every attachment the runtime still has.
    valid_attachments: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    @property
    def pod_name(self) -> str | None:
        """The CRI sandbox name (K8S_POD_NAME), which capsa sets to the capsule's uuid."""
        return self.args.get("K8S_POD_NAME")

    @property
    def prev_result(self) -> Mapping[str, Any] | None:
        """The result of the plugins before this one (parse_request checked it is an object)."""
        prev: Mapping[str, Any] | None = self.network_config.get("prevResult")
        return prev

    @property
    def dns(self) -> Mapping[str, Any] | None:
        """The well-known ``dns`` key of the config, which the result repeats."""
        dns: Mapping[str, Any] | None = self.network_config.get("dns")
        return dns


def attachment_owner(daemon_address: str, network_name: str) -> str:
    """Who makes the attachments of a network served by the daemon at ``daemon_address``.

    Several capsa instances on one machine have daemons of their own, so their attachments
    never share an owner and a GC of one leaves the others' alone.
    """
    return hashlib.sha256(f"{daemon_address}\n{network_name}".encode()).hexdigest()[:16]


def bridge_keeper(daemon_address: str) -> str:
    """The mark of the bridges made by the daemon at ``daemon_address``, so that it finds, when
    it starts, the unused ones that an earlier run of it left (killed while they lingered), and
    never another daemon's."""
    return hashlib.sha256(f"bridges of {daemon_address}".encode()).hexdigest()[:16]


def decode_header(value: str) -> str:
    """A variable as capsa-cni sent it in its header; bytes that are not UTF-8 come back as
    ``os.environ`` would have them (surrogate escapes)."""
    return unquote(value, errors="surrogateescape")


def parse_config(body: bytes) -> dict[str, Any]:
    """The network config that the runtime gave capsa-cni on stdin, which must be one JSON
    object."""
    try:
        config = json.loads(body.decode("utf-8"))
    except ValueError as exc:
        raise CniError(
            ErrorCode.DECODING_FAILURE, "the network config on stdin is not valid JSON", str(exc)
        ) from None
    if not isinstance(config, dict):
        raise CniError(
            ErrorCode.DECODING_FAILURE, "the network config on stdin is not a JSON object"
        )
    return config


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.0.0"`` as ``(1, 0, 0)``; ValueError if it is not dotted numbers."""
    return tuple(int(part) for part in version.split("."))


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` (``KEY=VALUE;KEY=VALUE``, in any order) as a dict.

    Empty pieces are skipped; a piece without ``=``, with an empty key, or a key given twice is an
    error that names the piece.
    """
    args: dict[str, str] = {}
    for piece in text.split(";"):
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        if not sep or not key:
            raise CniError(
                ErrorCode.INVALID_ENVIRONMENT,
                f"CNI_ARGS has an invalid pair {piece!r}",
                "expected KEY=VALUE pairs separated by ';'",
            )
        if key in args:
            raise CniError(
                ErrorCode.INVALID_ENVIRONMENT,
                f"CNI_ARGS gives {key!r} twice ({args[key]!r} and {value!r})",
            )
        args[key] = value
    return args


def parse_request(
    command: str, environment: Mapping[str, str], config: dict[str, Any]
) -> CniRequest:
    """Checks a forwarded call: command, version, config, required variables and their syntax.
    ``environment`` holds the CNI variables the runtime set (a missing one counts as empty)."""
    if command not in COMMANDS:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_COMMAND {command!r} is not supported by capsa-cni: expected one of "
            + ", ".join(COMMANDS),
        )
    version = _check_version(command, config.get("cniVersion"))
    name = _check_network_name(config.get("name"))
    env = {variable: environment.get(variable, "") for variable in ENVIRONMENT_HEADERS}
    missing = [v for v in REQUIRED_ENVIRONMENT[command] if not env[v]]
    if missing:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"{command} needs {', '.join(missing)}, which the runtime did not set",
        )
    if command in ATTACHMENT_COMMANDS:
        _check_identifier(env["CNI_CONTAINERID"], "CNI_CONTAINERID", ErrorCode.INVALID_ENVIRONMENT)
        _check_ifname(env["CNI_IFNAME"])
    if command in ("ADD", "CHECK"):
        _check_config_objects(config)
        _check_supported_fields(config)
    return CniRequest(
        command=command,
        container_id=env["CNI_CONTAINERID"] if command in ATTACHMENT_COMMANDS else "",
        netns=env["CNI_NETNS"] if command in ATTACHMENT_COMMANDS else "",
        ifname=env["CNI_IFNAME"] if command in ATTACHMENT_COMMANDS else "",
        args=parse_cni_args(env["CNI_ARGS"]),
        cni_version=version,
        network_name=name,
        network_config=config,
        valid_attachments=_valid_attachments(config) if command == "GC" else frozenset(),
    )


def _check_version(command: str, version: object) -> str:
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported by capsa-cni",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    first = FIRST_VERSION.get(command)
    if first and version_tuple(version) < version_tuple(first):
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version} has no {command}: it came with CNI {first}",
            f"the runtime must not call {command} for a network config older than {first}",
        )
    return version


def _check_network_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise CniError(
            ErrorCode.INVALID_NETWORK_CONFIG,
            "the network config has no `name`",
            "the runtime copies the conflist's name into every plugin's config",
        )
    # SPEC.md, section 1: the same syntax as a container id.
    _check_identifier(name, "the network name", ErrorCode.INVALID_NETWORK_CONFIG)
    return name


def _check_identifier(value: str, what: str, code: ErrorCode) -> None:
    # SPEC.md: an alphanumeric, then alphanumerics, underscores, dots or hyphens.
    if not (
        value[:1].isascii()
        and value[:1].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)
    ):
        raise CniError(
            code,
            f"{what} {value!r} must start with a letter or digit and contain only "
            "letters, digits, '_', '.' and '-'",
        )


def _check_ifname(ifname: str) -> None:
    if (
        len(ifname.encode()) > _IFNAME_MAX
        or ifname in (".", "..")
        or any(c in "/:" or c.isspace() for c in ifname)
    ):
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_IFNAME {ifname!r} is not a usable interface name: at most {_IFNAME_MAX} bytes, "
            "no '/', ':' or whitespace",
        )


def _check_config_objects(config: Mapping[str, Any]) -> None:
    """The keys ADD and CHECK read, checked before anything is plugged (DEL reads none)."""
    for key in ("prevResult", "dns", "runtimeConfig"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CniError(
                ErrorCode.INVALID_NETWORK_CONFIG,
                f"the network config's {key!r} must be a JSON object, not {config[key]!r}",
            )
    _prev_lists(config.get("prevResult"))


def _check_supported_fields(config: Mapping[str, Any]) -> None:
    """Refuses (code 2, naming key and value) what capsa would otherwise silently ignore."""
    for key in UNSUPPORTED_KEYS:
        if key in config:
            raise CniError(
                ErrorCode.UNSUPPORTED_FIELD,
                f"capsa-cni does not support {key!r} (given {config[key]!r})",
                "capsa allocates every port's address itself; remove the key from the conflist",
            )
    for key, value in (config.get("runtimeConfig") or {}).items():
        if key not in ACCEPTED_RUNTIME_CONFIG:
            raise CniError(
                ErrorCode.UNSUPPORTED_FIELD,
                f"capsa-cni does not support runtimeConfig {key!r} (given {value!r})",
                "supported capabilities: " + ", ".join(sorted(ACCEPTED_RUNTIME_CONFIG)),
            )


def _valid_attachments(config: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    key = VALID_ATTACHMENTS_KEY if VALID_ATTACHMENTS_KEY in config else LEGACY_ATTACHMENTS_KEY
    entries = config.get(key)
    # Without the list every attachment would look stale: refuse rather than remove them all.
    if not isinstance(entries, list):
        raise CniError(
            ErrorCode.INVALID_NETWORK_CONFIG,
            f"GC needs {VALID_ATTACHMENTS_KEY!r} as a list, not {entries!r}",
            "the runtime lists the attachments it still has; an empty list means none",
        )
    valid = set()
    for entry in entries:
        container_id = entry.get("containerID") if isinstance(entry, dict) else None
        ifname = entry.get("ifname") if isinstance(entry, dict) else None
        if not isinstance(container_id, str) or not isinstance(ifname, str):
            raise CniError(
                ErrorCode.INVALID_NETWORK_CONFIG,
                f"{key!r} has an invalid entry {entry!r}",
                'expected objects {"containerID": ..., "ifname": ...}',
            )
        valid.add((container_id, ifname))
    return frozenset(valid)


def build_result(
    cni_version: str,
    plugged: Sequence[PluggedPort],
    dns: Mapping[str, Any] | None = None,
    prev_result: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ADD result for the pod's ``plugged`` ports in ``cni_version``, appended to
    ``prev_result`` if given.

    Each port gives three interfaces: its bridge, its host end and its pod end (with its netns as
    ``sandbox``), and an address that points at the pod end; the only route is the default route
    via the first port's gateway (the others' subnets are routed by their addresses). Versions
    before 1.0.0 also carry each address's IP ``version``; 1.1.0 adds the interfaces' ``mtu``.
    """
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"capsa-cni cannot produce a result for cniVersion {cni_version!r}",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    prev = _prev_lists(prev_result)
    version = version_tuple(cni_version)
    interfaces: list[dict[str, Any]] = list(prev["interfaces"])
    ips: list[dict[str, Any]] = list(prev["ips"])
    for port in plugged:
        for interface in (
            {"name": port.bridge.name, "mac": port.bridge.mac},
            {"name": port.host_end.name, "mac": port.host_end.mac},
            {"name": port.pod_end.name, "mac": port.pod_end.mac, "sandbox": port.netns},
        ):
            interfaces.append({**interface, "mtu": port.mtu} if version >= (1, 1, 0) else interface)
        ip: dict[str, Any] = {
            "address": str(port.address),
            "gateway": str(port.gateway),
            # The pod end just listed.
            "interface": len(interfaces) - 1,
        }
        ips.append({"version": "4", **ip} if version < (1, 0, 0) else ip)
    own_dns = dict(dns or {})
    prev_dns = prev_result.get("dns") if prev_result else None
    return {
        "cniVersion": cni_version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": [*prev["routes"], {"dst": "0.0.0.0/0", "gw": str(plugged[0].gateway)}],
        "dns": own_dns or (dict(prev_dns) if isinstance(prev_dns, Mapping) else {}),
    }


def prev_result_problems(
    prev_result: Mapping[str, Any], netns: str, ifname: str, port: PortBinding
) -> list[str]:
    """Where a CHECK's ``prevResult`` disagrees with the port capsa binds for the attachment.

    The pod end must be listed (named ``ifname``, in ``netns``), with the port's MAC if it gives
    one and the port's address among the IPs that point at it. Entries of other plugins are
    theirs to check.
    """
    lists = _prev_lists(prev_result)
    pod_end = next(
        (
            index
            for index, interface in enumerate(lists["interfaces"])
            if isinstance(interface, dict)
            and interface.get("name") == ifname
            and interface.get("sandbox") == netns
        ),
        None,
    )
    if pod_end is None:
        return [f"prevResult lists no interface {ifname} in netns {netns}"]
    problems = []
    mac = lists["interfaces"][pod_end].get("mac")
    if mac is not None and mac != port.mac:
        problems.append(f"prevResult gives {ifname} the MAC {mac}, the port has {port.mac}")
    addresses = [
        ip.get("address")
        for ip in lists["ips"]
        if isinstance(ip, dict) and ip.get("interface") == pod_end
    ]
    if str(port.ip) not in addresses:
        problems.append(
            f"prevResult gives {ifname} the addresses {addresses}, the port has {port.ip}"
        )
    return problems


def _prev_lists(prev_result: Mapping[str, Any] | None) -> dict[str, list[Any]]:
    lists: dict[str, list[Any]] = {}
    for key in ("interfaces", "ips", "routes"):
        value = prev_result.get(key, []) if prev_result else []
        if value is None:
            value = []
        if not isinstance(value, list):
            raise CniError(
                ErrorCode.INVALID_NETWORK_CONFIG, f"prevResult.{key} must be a list, not {value!r}"
            )
        lists[key] = value
    return lists

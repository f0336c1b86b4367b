"""The CNI protocol as the daemon sees it: requests forwarded by ``capsa-cni``, errors, results.

``capsa-cni`` forwards each call as ``POST /cni/<command>`` with a JSON envelope::

    {"containerId": CNI_CONTAINERID, "netns": CNI_NETNS, "ifname": CNI_IFNAME,
     "args": CNI_ARGS, "path": CNI_PATH, "config": <the network config from stdin>}

:func:`parse_request` checks it and returns a :class:`CniRequest`; :class:`CniError` carries a
spec error code; :func:`build_result` renders what was plugged in the conf's ``cniVersion``.
Nothing here touches the kernel or the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from capsa.network.types import PluggedPort

# Versions whose ADD result build_result can render; capsa-cni reports the same from VERSION.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
# What an error says when the request's own version is unknown or unsupported.
DEFAULT_VERSION = "1.0.0"
COMMANDS = ("ADD", "DEL", "CHECK")
# The environment each command needs (SPEC.md, section 2); the rest is optional.
REQUIRED_ENVIRONMENT = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
}
# The envelope key that carries each variable.
_ENVELOPE_KEYS = {
    "CNI_CONTAINERID": "containerId",
    "CNI_NETNS": "netns",
    "CNI_IFNAME": "ifname",
    "CNI_ARGS": "args",
    "CNI_PATH": "path",
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
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    cni_version: str
    # The plugin's network config as containerd passed it on stdin (name, type, prevResult, ...).
    network_config: dict[str, Any]

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


def parse_request(command: str, envelope: Mapping[str, Any]) -> CniRequest:
    """Checks a forwarded call: command, required variables, their syntax, the config."""
    if command not in COMMANDS:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_COMMAND {command!r} is not supported by capsa-cni: expected one of "
            + ", ".join(COMMANDS),
        )
    config = envelope.get("config")
    if not isinstance(config, dict):
        raise CniError(ErrorCode.DECODING_FAILURE, "the network config must be a JSON object")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported by capsa-cni",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    for key in ("prevResult", "dns"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CniError(
                ErrorCode.INVALID_NETWORK_CONFIG,
                f"the network config's {key!r} must be a JSON object, not {config[key]!r}",
            )
    env: dict[str, str] = {}
    for variable, key in _ENVELOPE_KEYS.items():
        value = envelope.get(key, "")
        if not isinstance(value, str):
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"{variable} must be a string")
        env[variable] = value
    missing = [v for v in REQUIRED_ENVIRONMENT[command] if not env[v]]
    if missing:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"{command} needs {', '.join(missing)}, which the runtime did not set",
        )
    _check_container_id(env["CNI_CONTAINERID"])
    _check_ifname(env["CNI_IFNAME"])
    return CniRequest(
        command=command,
        container_id=env["CNI_CONTAINERID"],
        netns=env["CNI_NETNS"],
        ifname=env["CNI_IFNAME"],
        args=parse_cni_args(env["CNI_ARGS"]),
        cni_version=version,
        network_config=config,
    )


def _check_container_id(container_id: str) -> None:
    # SPEC.md: an alphanumeric, then alphanumerics, underscores, dots or hyphens.
    if not (
        container_id[:1].isascii()
        and container_id[:1].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in container_id)
    ):
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {container_id!r} must start with a letter or digit and contain only "
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


def build_result(
    cni_version: str,
    plugged: PluggedPort,
    dns: Mapping[str, Any] | None = None,
    prev_result: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ADD result for ``plugged`` in ``cni_version``, appended to ``prev_result`` if given.

    Interfaces are the bridge, the host end and the pod end (with its netns as ``sandbox``); the
    address points at the pod end; the route is the default route via the gateway. Versions
    before 1.0.0 also carry each address's IP ``version``.
    """
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"capsa-cni cannot produce a result for cniVersion {cni_version!r}",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    prev = _prev_lists(prev_result)
    interfaces: list[dict[str, Any]] = [
        {"name": plugged.bridge.name, "mac": plugged.bridge.mac},
        {"name": plugged.host_end.name, "mac": plugged.host_end.mac},
        {"name": plugged.pod_end.name, "mac": plugged.pod_end.mac, "sandbox": plugged.netns},
    ]
    ip: dict[str, Any] = {
        "address": str(plugged.address),
        "gateway": str(plugged.gateway),
        # The pod end, counted after the interfaces of prevResult.
        "interface": len(prev["interfaces"]) + len(interfaces) - 1,
    }
    if cni_version != "1.0.0":
        ip = {"version": "4", **ip}
    route = {"dst": "0.0.0.0/0", "gw": str(plugged.gateway)}
    own_dns = dict(dns or {})
    prev_dns = prev_result.get("dns") if prev_result else None
    return {
        "cniVersion": cni_version,
        "interfaces": prev["interfaces"] + interfaces,
        "ips": [*prev["ips"], ip],
        "routes": [*prev["routes"], route],
        "dns": own_dns or (dict(prev_dns) if isinstance(prev_dns, Mapping) else {}),
    }


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

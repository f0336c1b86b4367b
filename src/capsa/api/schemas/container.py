"""``POST /v1/containers`` bodies: Zun's container, at the request's microversion, to the spec of a
capsule of kind ``container`` (one container in its own sandbox, as Zun's CRI integration runs it).

Zun's fields and their forms: ``cpu`` in cores and ``memory`` in MiB, numbers or strings of them;
``command`` a string split like a shell below 1.20 and a list from 1.20 on (Docker's command: the
CRI args), ``entrypoint`` a list from 1.40 (the CRI command); ``interactive`` also sets ``tty``
from 1.20 to 1.35. Fields that Zun added in a later microversion are refused below it, with Zun's
message. What capsa cannot do is refused with the reason, never ignored: a ``port`` or fixed
address in ``nets`` (a container gets a new port on each network it names), ``mounts``,
``healthcheck``, ``hints``, ``disk``, a requested ``host``, ``dedicated`` cpus, an image driver
other than docker.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from capsa.api.microversion import APIVersion
from capsa.api.schemas.fields import (
    ImageName,
    ObjectName,
    TemplateDefaults,
    TemplateFieldError,
)
from capsa.api.schemas.template import TemplateError, describe_error, with_registry
from capsa.api.schemas.zun import ZunBoolean, ZunCpu, ZunMemory, ZunPullPolicy
from capsa.model.capsule import (
    CapsuleKind,
    CapsuleSpec,
    ContainerSpec,
    PortSpec,
    PullPolicy,
    RestartPolicy,
)
from capsa.model.network import MAX_CAPSULE_NETWORKS
from capsa.model.registry import RegistryDirectory

# The microversion that introduced each field Zun checks (api_utils.version_check and schemas).
_SINCE = {
    "auto_remove": APIVersion(1, 3),
    "runtime": APIVersion(1, 5),
    "hostname": APIVersion(1, 9),
    "privileged": APIVersion(1, 21),
    "exposed_ports": APIVersion(1, 24),
    "cpu_policy": APIVersion(1, 28),
    "registry": APIVersion(1, 31),
    "host": APIVersion(1, 39),
    "entrypoint": APIVersion(1, 40),
}
COMMAND_AS_LIST = APIVersion(1, 20)
# From 1.20 to 1.35 Zun makes ``interactive`` set ``tty`` too.
_INTERACTIVE_IS_TTY = (APIVersion(1, 20), APIVersion(1, 35))

_RESTART_POLICIES = {policy.value: policy for policy in RestartPolicy}
Text = Annotated[str, Field(min_length=1, max_length=255)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


class Net(_Body):
    network: Text | None = None
    port: Text | None = None
    v4_fixed_ip: str | None = Field(default=None, alias="v4-fixed-ip")
    v6_fixed_ip: str | None = Field(default=None, alias="v6-fixed-ip")


class ZunRestartPolicy(_Body):
    name: Literal["no", "always", "on-failure", "unless-stopped"] = Field(alias="Name")
    maximum_retry_count: int | Annotated[str, Field(pattern=r"^[0-9]+$")] | None = Field(
        default=None, alias="MaximumRetryCount"
    )


class ContainerBody(_Body):
    """Zun's container create schema (every microversion's fields; the version is checked after)."""

    name: ObjectName | None = None
    image: ImageName
    command: list[str] | str | None = None
    entrypoint: list[str] | None = None
    cpu: ZunCpu | None = None
    memory: ZunMemory | None = None
    disk: int | str | None = None
    workdir: str | None = None
    image_pull_policy: ZunPullPolicy | None = None
    labels: dict[str, str] | None = None
    environment: dict[str, str] | None = None
    restart_policy: ZunRestartPolicy | None = None
    interactive: ZunBoolean | None = None
    tty: ZunBoolean | None = None
    image_driver: str | None = None
    security_groups: list[Text] | None = None
    hints: dict[str, Any] | None = None
    mounts: list[Any] | None = None
    nets: list[Net] | None = None
    runtime: Text | None = None
    hostname: Annotated[str, Field(min_length=2, max_length=63)] | None = None
    availability_zone: Text | None = None
    auto_heal: ZunBoolean | None = None
    auto_remove: ZunBoolean | None = None
    privileged: ZunBoolean | None = None
    healthcheck: dict[str, Any] | None = None
    exposed_ports: dict[str, dict[str, Any]] | None = None
    registry: Text | None = None
    host: Text | None = None
    cpu_policy: Literal["shared", "dedicated"] | None = None


@dataclass(frozen=True)
class ContainerRequest:
    """What a create asks: the capsule's spec, and where it is attached (networks, in the order
    of its interfaces, and security groups as the tenant named them, by name or id, which the
    handler resolves into the spec's annotations)."""

    spec: CapsuleSpec
    networks: tuple[str, ...]
    security_groups: tuple[str, ...]


def parse_container_body(
    body: Any,
    version: APIVersion,
    defaults: TemplateDefaults,
    fallback_name: str,
    registries: RegistryDirectory,
) -> ContainerRequest:
    """The single container a create at ``version`` asks for (named ``fallback_name`` if the body
    has no name); TemplateError names each field to change."""
    if not isinstance(body, dict):
        raise TemplateError("the request body must be a JSON object: a container")
    try:
        parsed = ContainerBody.model_validate(body)
        return _to_request(parsed, set(body), version, defaults, fallback_name, registries)
    except ValidationError as exc:
        raise TemplateError("; ".join(describe_error(e, "") for e in exc.errors())) from None
    except TemplateFieldError as exc:
        raise TemplateError(f"{exc.path}: {exc.message}") from None


def _to_request(
    body: ContainerBody,
    given: set[str],
    version: APIVersion,
    defaults: TemplateDefaults,
    fallback: str,
    registries: RegistryDirectory,
) -> ContainerRequest:
    for field, since in _SINCE.items():
        if field in given and version < since:
            raise TemplateFieldError(
                field,
                f"Invalid param {field} because current request version is {version}. "
                f"{field} is only supported from version {since}",
            )
    _refuse_unsupported(body)
    name = body.name or fallback
    interactive = bool(body.interactive)
    tty = interactive if _INTERACTIVE_IS_TTY[0] <= version <= _INTERACTIVE_IS_TTY[1] else body.tty
    if body.security_groups and body.exposed_ports and version >= COMMAND_AS_LIST:
        raise TemplateFieldError(
            "security_groups",
            "cannot be given with exposed_ports: exposed ports choose the container's groups",
        )
    container = ContainerSpec(
        name=name,
        image=body.image,
        cpu_millis=body.cpu or defaults.cpu_millis,
        memory_mb=body.memory or defaults.memory_mb,
        command=tuple(body.entrypoint or ()),
        args=_command(body.command, version),
        workdir=body.workdir or None,
        env=dict(body.environment or {}),
        image_pull_policy=body.image_pull_policy or PullPolicy.IF_NOT_PRESENT,
        tty=bool(tty),
        stdin=interactive,
        ports=_exposed_ports(body.exposed_ports or {}),
        privileged=bool(body.privileged),
    )
    container = with_registry(container, body.registry, "", registries)
    policy, max_retries = _restart(body.restart_policy)
    spec = CapsuleSpec(
        name=name,
        containers=(container,),
        labels=dict(body.labels or {}),
        restart_policy=policy,
        runtime=body.runtime,
        kind=CapsuleKind.CONTAINER,
        hostname=body.hostname,
        max_retries=max_retries,
        auto_remove=bool(body.auto_remove),
    )
    groups = tuple(dict.fromkeys(body.security_groups or ()))
    return ContainerRequest(spec, _networks(body.nets or []), groups)


def _refuse_unsupported(body: ContainerBody) -> None:
    refusals = {
        "mounts": "volumes are not supported yet" if body.mounts else None,
        "healthcheck": "health checks are not supported yet" if body.healthcheck else None,
        "hints": "scheduler hints are not supported" if body.hints else None,
        "disk": "disk quotas are not supported" if body.disk not in (None, 0, "0") else None,
        "host": "choosing the host is not supported; the scheduler places containers"
        if body.host
        else None,
        "cpu_policy": "dedicated cpus are not supported; only 'shared'"
        if body.cpu_policy == "dedicated"
        else None,
        "image_driver": "only the 'docker' image driver (images from a registry) is supported"
        if body.image_driver not in (None, "None", "docker")
        else None,
    }
    for field, reason in refusals.items():
        if reason is not None:
            raise TemplateFieldError(field, reason)


def _command(command: list[str] | str | None, version: APIVersion) -> tuple[str, ...]:
    if command is None:
        return ()
    if version >= COMMAND_AS_LIST:
        if isinstance(command, str):
            raise TemplateFieldError("command", f"must be a list of strings from version {version}")
        return tuple(command)
    if not isinstance(command, str):
        raise TemplateFieldError("command", f"must be a string before version {COMMAND_AS_LIST}")
    try:
        return tuple(shlex.split(command))
    except ValueError as exc:
        raise TemplateFieldError("command", f"cannot be split like a shell would: {exc}") from None


def _exposed_ports(ports: dict[str, dict[str, Any]]) -> tuple[PortSpec, ...]:
    """Zun's ``{"<port>/<protocol>": {}}`` (protocol tcp, the default, or udp)."""
    specs = []
    for key in ports:
        number, _, protocol = key.partition("/")
        protocol = protocol or "tcp"
        if protocol not in ("tcp", "udp"):
            raise TemplateFieldError("exposed_ports", f"value {protocol} is an invalid protocol")
        if not number.isdigit() or not 1 <= int(number) <= 65535:
            raise TemplateFieldError("exposed_ports", f"value {number} is invalid as publish port")
        specs.append(PortSpec(container_port=int(number), protocol=protocol.upper()))
    return tuple(specs)


def _restart(policy: ZunRestartPolicy | None) -> tuple[RestartPolicy, int]:
    """The policy and its MaximumRetryCount; none given is Docker's (and Zun's) ``no``."""
    if policy is None:
        return RestartPolicy.NEVER, 0
    count = int(policy.maximum_retry_count or 0)
    if policy.name in ("always", "unless-stopped") and count != 0:
        raise TemplateFieldError(
            "restart_policy",
            f"maximum retry count not valid with restart policy of {policy.name}",
        )
    name = _RESTART_POLICIES[policy.name]
    return name, count if name is RestartPolicy.ON_FAILURE else 0


def _networks(nets: list[Net]) -> tuple[str, ...]:
    """The networks named in ``nets``, in order (none: the project's default network)."""
    if len(nets) > MAX_CAPSULE_NETWORKS:
        raise TemplateFieldError(
            "nets", f"a container joins at most {MAX_CAPSULE_NETWORKS} networks, not {len(nets)}"
        )
    return tuple(_network(index, net) for index, net in enumerate(nets))


def _network(index: int, net: Net) -> str:
    field = f"nets[{index}]"
    if net.port is not None:
        raise TemplateFieldError(
            f"{field}.port",
            "attaching an existing port is not supported: name a network and the container "
            "gets a new port on it",
        )
    if net.v4_fixed_ip is not None or net.v6_fixed_ip is not None:
        raise TemplateFieldError(
            field, "fixed addresses are not supported: the network chooses the address"
        )
    if net.network is None:
        raise TemplateFieldError(field, "name a network: {'network': NAME-OR-ID}")
    return net.network

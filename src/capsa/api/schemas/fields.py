"""Field types shared by the Zun capsule template and the Kubernetes Pod manifest.

Every model refuses unknown keys and converts nothing silently (a number is not a string, a string
is not a boolean), so that a typo is a 400 naming the field rather than a setting that is ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from capsa.model.capsule import ContainerSpec, PortSpec, PullPolicy, RestartPolicy
from capsa.model.image_ref import InvalidImageReference, parse_image_reference


@dataclass(frozen=True)
class TemplateDefaults:
    """What a template gets when it leaves something out, and how big it may be."""

    cpu_millis: int
    memory_mb: int
    max_containers: int


class TemplateFieldError(ValueError):
    """A rule that spans several fields, with the path of the field to change."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class TemplateModel(BaseModel):
    """A part of a template: camelCase keys, unknown keys refused, no type coercion."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, alias_generator=to_camel, validate_by_name=False
    )


# Zun's rule for capsule and container names, relaxed to allow one character as Kubernetes does.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_MAX_NAME = 255


def _check_name(value: str) -> str:
    if len(value) > _MAX_NAME or not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: at most {_MAX_NAME} letters, digits, "
            "'_', '.' and '-', starting with a letter or a digit"
        )
    return value


def _check_image(value: str) -> str:
    try:
        parse_image_reference(value)
    except InvalidImageReference as exc:
        raise ValueError(f"{value!r} is not a valid image name: {exc}") from exc
    return value


def _refuse_volumes(value: list[Any] | None) -> None:
    if value:
        raise ValueError(
            "volumes are not supported yet; remove spec.volumes and the containers' volumeMounts"
        )


ObjectName = Annotated[str, AfterValidator(_check_name)]
ImageName = Annotated[str, AfterValidator(_check_image)]
StringMap = dict[str, str]
# Accepted only empty, so that a template that relies on volumes is refused instead of run without.
NotSupportedYet = Annotated[list[Any] | None, AfterValidator(_refuse_volumes)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]
RestartPolicyName = Literal["Always", "OnFailure", "Never"]

RESTART_POLICIES: dict[str, RestartPolicy] = {
    "Always": RestartPolicy.ALWAYS,
    "OnFailure": RestartPolicy.ON_FAILURE,
    "Never": RestartPolicy.NEVER,
}


class ContainerPort(TemplateModel):
    container_port: PortNumber
    host_port: PortNumber | None = None
    name: str | None = None
    protocol: Literal["TCP", "UDP"] = "TCP"

    def to_spec(self) -> PortSpec:
        return PortSpec(
            container_port=self.container_port,
            protocol=self.protocol,
            host_port=self.host_port,
            name=self.name,
        )


class ContainerTemplate(TemplateModel):
    """What a Zun template and a Pod manifest say alike about a container."""

    # Optional in Zun's templates (capsa then names the container), required in Pods.
    name: ObjectName | None = None
    image: ImageName
    command: list[str] | None = None
    args: list[str] | None = None
    ports: list[ContainerPort] | None = None
    stdin: bool | None = None
    tty: bool | None = None
    volume_mounts: NotSupportedYet = None

    def to_spec(self, name: str, defaults: TemplateDefaults, path: str) -> ContainerSpec:
        """The container's spec, named ``name``; ``path`` locates it in the template for errors."""
        raise NotImplementedError

    @property
    def registry_ref(self) -> str | None:
        """The private registry the template names for this container (uuid or name), if any."""
        return None

    def container_spec(
        self,
        name: str,
        *,
        cpu_millis: int,
        memory_mb: int,
        workdir: str | None,
        env: dict[str, str],
        pull_policy: PullPolicy | None,
        privileged: bool | None,
    ) -> ContainerSpec:
        return ContainerSpec(
            name=name,
            image=self.image,
            cpu_millis=cpu_millis,
            memory_mb=memory_mb,
            command=tuple(self.command or ()),
            args=tuple(self.args or ()),
            # An empty working directory (Virtual Kubelet sends one) means the image's own.
            workdir=workdir or None,
            env=env,
            image_pull_policy=pull_policy or PullPolicy.IF_NOT_PRESENT,
            tty=bool(self.tty),
            stdin=bool(self.stdin),
            ports=tuple(p.to_spec() for p in self.ports or ()),
            privileged=bool(privileged),
        )


# Kubernetes quantities: a decimal number with an optional binary, decimal or exponent suffix.
_QUANTITY = re.compile(
    r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE]-?[0-9]+)?"
)
_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: object, what: str) -> Decimal:
    """A Kubernetes quantity ("500m", "64Mi", "1G", 0.5) as a positive decimal."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number or a quantity string such as '500m' or '64Mi'")
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value)
        if not match:
            raise ValueError(f"{value!r} is not a valid {what} quantity (examples: 500m, 64Mi, 1G)")
        number, suffix = match.group(1), match.group(2) or ""
        if suffix[:1] in ("e", "E"):
            amount = Decimal(number).scaleb(int(suffix[1:]))
        else:
            amount = Decimal(number) * _SUFFIXES[suffix]
    else:
        amount = decimal_number(value, what)
    if amount <= 0:
        raise ValueError(f"{what} must be greater than zero")
    return amount


def decimal_number(value: object, what: str) -> Decimal:
    """A JSON number, or a string of digits with an optional fraction, as a decimal."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{what} must be a number, not {value!r}") from None
    if not amount.is_finite():
        raise ValueError(f"{what} must be a finite number")
    return amount


def millicores(cores: Decimal, what: str) -> int:
    """Cores as whole millicores, rounded up as Kubernetes does; at least one."""
    millis = math.ceil(cores * 1000)
    if millis <= 0:
        raise ValueError(f"{what} must be greater than zero")
    return millis


def mebibytes(amount: Decimal) -> int:
    """Bytes as whole MiB, rounded up."""
    return math.ceil(amount / _SUFFIXES["Mi"])

"""Zun's capsule template (``kind: capsule``), as Zun's API schema defines it.

Resources are Zun's: ``cpu`` in cores (a number, or a string of one), ``memory`` in MiB (an integer,
or a string of digits). Booleans also accept the strings Zun accepts ("true", "False", ...).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from capsa.api.schemas.fields import (
    RESTART_POLICIES,
    ContainerTemplate,
    NotSupportedYet,
    ObjectName,
    RestartPolicyName,
    StringMap,
    TemplateDefaults,
    TemplateModel,
    decimal_number,
    millicores,
)
from capsa.model.capsule import ContainerSpec, PullPolicy, RestartPolicy


def _cpu_millis(value: object) -> int:
    return millicores(decimal_number(value, "cpu"), "cpu")


def _memory_mb(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("memory must be a whole number of MiB (an integer, or a string of digits)")
    if value <= 0:
        raise ValueError("memory must be greater than zero")
    return value


_BOOLEAN_STRINGS = {"true": True, "false": False}


def _boolean(value: object) -> object:
    if isinstance(value, str) and value in ("True", "true", "False", "false"):
        return _BOOLEAN_STRINGS[value.lower()]
    return value


_PULL_POLICIES = {policy.value.lower(): policy for policy in PullPolicy}


def _pull_policy(value: object) -> PullPolicy:
    policy = _PULL_POLICIES.get(value.lower()) if isinstance(value, str) else None
    if policy is None or value not in (policy.value, policy.value.lower()):
        raise ValueError(
            f"{value!r} is not an image pull policy: use Always, IfNotPresent or Never"
        )
    return policy


ZunCpu = Annotated[int, BeforeValidator(_cpu_millis)]
ZunMemory = Annotated[int, BeforeValidator(_memory_mb)]
ZunBoolean = Annotated[bool, BeforeValidator(_boolean)]
ZunPullPolicy = Annotated[PullPolicy, BeforeValidator(_pull_policy)]


class ZunRequests(TemplateModel):
    cpu: ZunCpu | None = None
    memory: ZunMemory | None = None


class ZunResources(TemplateModel):
    requests: ZunRequests | None = None


class ZunContainer(ContainerTemplate):
    work_dir: str | None = None
    env: StringMap | None = None
    resources: ZunResources | None = None
    image_pull_policy: ZunPullPolicy | None = None
    stdin: ZunBoolean | None = None
    tty: ZunBoolean | None = None
    # capsa's extensions, after Zun's container fields: the private registry to pull from (1.31),
    # and whether the container is privileged (1.21; only in projects an admin allowed).
    registry: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    privileged: ZunBoolean | None = None

    @property
    def registry_ref(self) -> str | None:
        return self.registry

    def to_spec(self, name: str, defaults: TemplateDefaults, path: str) -> ContainerSpec:
        requests = self.resources.requests if self.resources else None
        cpu = requests.cpu if requests else None
        memory = requests.memory if requests else None
        return self.container_spec(
            name,
            cpu_millis=cpu or defaults.cpu_millis,
            memory_mb=memory or defaults.memory_mb,
            workdir=self.work_dir,
            env=dict(self.env or {}),
            pull_policy=self.image_pull_policy,
            privileged=self.privileged,
        )


class ZunSpec(TemplateModel):
    containers: list[ZunContainer]
    init_containers: list[ZunContainer] | None = None
    volumes: NotSupportedYet = None
    restart_policy: RestartPolicyName | None = None


class ZunMetadata(TemplateModel):
    name: ObjectName | None = None
    labels: StringMap | None = None
    annotations: StringMap | None = None


class ZunTemplate(TemplateModel):
    kind: Literal["capsule", "Capsule"]
    capsule_version: Literal["beta", "Beta"] | None = None
    metadata: ZunMetadata
    spec: ZunSpec
    # Deprecated in Zun in favour of spec.restartPolicy, which wins when both are given.
    restart_policy: RestartPolicyName | None = None
    # capsa has a single zone; the field is accepted because Zun's clients send it.
    availability_zone: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @property
    def restart(self) -> RestartPolicy:
        name = self.spec.restart_policy or self.restart_policy
        return RESTART_POLICIES[name] if name else RestartPolicy.ALWAYS

    @property
    def runtime(self) -> str | None:
        """Zun templates cannot name a runtime: the host's default runs them."""
        return None

    @property
    def pull_secrets(self) -> tuple[str, ...]:
        """Zun templates name registries per container instead."""
        return ()

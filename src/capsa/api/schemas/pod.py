"""A Kubernetes Pod manifest (``apiVersion: v1, kind: Pod``), the subset capsa runs.

Resources are Kubernetes quantities: cpu in cores ("500m", "0.5", 1) and memory in bytes ("64Mi",
"1G", 67108864). A container has one cpu and one memory figure, which capsa both claims on the host
and enforces: the limit when the manifest gives one (the container must be able to use it), else
the request, else the configured default.
"""

from __future__ import annotations

from decimal import Decimal
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
    TemplateFieldError,
    TemplateModel,
    mebibytes,
    millicores,
    parse_quantity,
)
from capsa.model.capsule import ContainerSpec, PullPolicy, RestartPolicy


def _cpu(value: object) -> Decimal:
    return parse_quantity(value, "cpu")


def _memory(value: object) -> Decimal:
    return parse_quantity(value, "memory")


PodCpu = Annotated[Decimal, BeforeValidator(_cpu)]
PodMemory = Annotated[Decimal, BeforeValidator(_memory)]


class ResourceList(TemplateModel):
    cpu: PodCpu | None = None
    memory: PodMemory | None = None


class Resources(TemplateModel):
    requests: ResourceList | None = None
    limits: ResourceList | None = None

    def amount(self, resource: Literal["cpu", "memory"], path: str) -> Decimal | None:
        """The figure capsa uses for ``resource``: the limit, else the request, else None."""
        request = getattr(self.requests, resource) if self.requests else None
        limit = getattr(self.limits, resource) if self.limits else None
        if request is not None and limit is not None and request > limit:
            raise TemplateFieldError(
                f"{path}.requests.{resource}",
                f"must not be greater than limits.{resource} ({limit})",
            )
        return limit if limit is not None else request


class EnvVar(TemplateModel):
    name: Annotated[str, Field(min_length=1)]
    value: str = ""


class SecurityContext(TemplateModel):
    """A container's securityContext: capsa takes ``privileged`` (only in projects an admin
    allowed); other settings are refused rather than ignored."""

    privileged: bool | None = None


class PodContainer(ContainerTemplate):
    name: ObjectName
    working_dir: str | None = None
    env: list[EnvVar] | None = None
    resources: Resources | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    security_context: SecurityContext | None = None

    def to_spec(self, name: str, defaults: TemplateDefaults, path: str) -> ContainerSpec:
        cpu = memory = None
        if self.resources:
            cpu = self.resources.amount("cpu", f"{path}.resources")
            memory = self.resources.amount("memory", f"{path}.resources")
        return self.container_spec(
            name,
            cpu_millis=millicores(cpu, "cpu") if cpu is not None else defaults.cpu_millis,
            memory_mb=mebibytes(memory) if memory is not None else defaults.memory_mb,
            workdir=self.working_dir,
            # Later entries win, as in Kubernetes.
            env={var.name: var.value for var in self.env or ()},
            pull_policy=PullPolicy(self.image_pull_policy) if self.image_pull_policy else None,
            privileged=self.security_context.privileged if self.security_context else None,
        )


class LocalObjectReference(TemplateModel):
    name: Annotated[str, Field(min_length=1, max_length=255)]


class PodSpec(TemplateModel):
    containers: list[PodContainer]
    init_containers: list[PodContainer] | None = None
    restart_policy: RestartPolicyName | None = None
    runtime_class_name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    volumes: NotSupportedYet = None
    # Each names a private registry of the project (by name or uuid), as Kubernetes names a
    # docker-registry Secret.
    image_pull_secrets: list[LocalObjectReference] | None = None


class PodMetadata(TemplateModel):
    name: ObjectName | None = None
    labels: StringMap | None = None
    annotations: StringMap | None = None


class PodManifest(TemplateModel):
    api_version: Literal["v1"]
    kind: Literal["Pod"]
    metadata: PodMetadata
    spec: PodSpec

    @property
    def restart(self) -> RestartPolicy:
        name = self.spec.restart_policy
        return RESTART_POLICIES[name] if name else RestartPolicy.ALWAYS

    @property
    def runtime(self) -> str | None:
        return self.spec.runtime_class_name

    @property
    def pull_secrets(self) -> tuple[str, ...]:
        return tuple(secret.name for secret in self.spec.image_pull_secrets or ())

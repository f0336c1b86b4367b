"""``POST /v1/capsules`` bodies: ``{"template": T}`` to a :class:`CapsuleSpec`, or a reason.

``T`` is an object or a JSON string (gophercloud sends the template's bytes as a string), holding
either a Zun capsule template (``kind: capsule``) or a Kubernetes Pod manifest (``apiVersion: v1,
kind: Pod``). Both map onto the same spec. Every refusal names the field to fix, as a path from the
body (``template.spec.containers[0].image``), and lists every problem found, not only the first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from capsa.api.schemas.fields import ContainerTemplate, TemplateDefaults, TemplateFieldError
from capsa.api.schemas.pod import PodManifest
from capsa.api.schemas.zun import ZunTemplate
from capsa.model.capsule import CapsuleSpec, ContainerSpec
from capsa.model.registry import Registry, RegistryChoiceError, RegistryDirectory

NO_REGISTRIES = RegistryDirectory()


class TemplateError(ValueError):
    """The body cannot become a capsule; the message says what to change."""


def parse_create_body(
    body: Any,
    defaults: TemplateDefaults,
    fallback_name: str,
    registries: RegistryDirectory = NO_REGISTRIES,
) -> CapsuleSpec:
    """The capsule a create request asks for (named ``fallback_name`` if the template has none),
    each container with the private registry it pulls from among ``registries``."""
    if not isinstance(body, dict):
        raise TemplateError('the request body must be a JSON object: {"template": ...}')
    unknown = sorted(set(body) - {"template"})
    if unknown:
        raise TemplateError(
            f"unknown field(s) in the request body: {', '.join(unknown)}; "
            "only 'template' is accepted"
        )
    if "template" not in body:
        raise TemplateError("template: required field is missing")
    template = body["template"]
    if isinstance(template, str):
        try:
            template = json.loads(template)
        except json.JSONDecodeError as exc:
            raise TemplateError(
                f"template: a template given as a string must be JSON ({exc}); "
                "convert YAML to JSON or send the template as an object"
            ) from None
    if not isinstance(template, dict):
        raise TemplateError("template: must be an object (or a JSON string of one)")
    try:
        return _to_spec(template, defaults, fallback_name, registries)
    except ValidationError as exc:
        raise TemplateError(
            "; ".join(describe_error(e, "template") for e in exc.errors())
        ) from None
    except TemplateFieldError as exc:
        raise TemplateError(f"template.{exc.path}: {exc.message}") from None


def _to_spec(
    template: dict[str, Any],
    defaults: TemplateDefaults,
    fallback: str,
    registries: RegistryDirectory,
) -> CapsuleSpec:
    parsed = _validate(template)
    pull_secrets = [
        _registry(registries, name, f"spec.imagePullSecrets[{index}].name")
        for index, name in enumerate(parsed.pull_secrets)
    ]
    containers, init_containers = _container_specs(
        parsed.spec.containers,
        parsed.spec.init_containers or [],
        defaults,
        lambda spec, container, path: with_registry(
            spec, container.registry_ref, path, registries, pull_secrets
        ),
    )
    return CapsuleSpec(
        name=parsed.metadata.name or fallback,
        containers=containers,
        init_containers=init_containers,
        labels=dict(parsed.metadata.labels or {}),
        annotations=dict(parsed.metadata.annotations or {}),
        restart_policy=parsed.restart,
        runtime=parsed.runtime,
    )


def _validate(template: dict[str, Any]) -> PodManifest | ZunTemplate:
    kind = template.get("kind")
    if kind == "Pod" or "apiVersion" in template:
        return PodManifest.model_validate(template)
    if kind in ("capsule", "Capsule"):
        return ZunTemplate.model_validate(template)
    raise TemplateFieldError(
        "kind",
        f"{kind!r} is not a template kind: use 'capsule' (a Zun capsule template) or 'Pod' "
        "with apiVersion 'v1' (a Kubernetes Pod manifest)",
    )


def _container_specs(
    containers: Sequence[ContainerTemplate],
    init_containers: Sequence[ContainerTemplate],
    defaults: TemplateDefaults,
    finish: Callable[[ContainerSpec, ContainerTemplate, str], ContainerSpec],
) -> tuple[tuple[ContainerSpec, ...], tuple[ContainerSpec, ...]]:
    """Specs of the containers and init containers, with names that are unique in the capsule."""
    if not containers:
        raise TemplateFieldError("spec.containers", "a capsule needs at least one container")
    total = len(containers) + len(init_containers)
    if total > defaults.max_containers:
        raise TemplateFieldError(
            "spec",
            f"{total} containers and init containers; "
            f"at most {defaults.max_containers} are allowed",
        )
    groups = (("spec.initContainers", init_containers), ("spec.containers", containers))
    taken: dict[str, str] = {}
    for prefix, group in groups:
        for index, container in enumerate(group):
            if container.name is None:
                continue
            path = f"{prefix}[{index}].name"
            if container.name in taken:
                raise TemplateFieldError(
                    path, f"{container.name!r} is already the name of {taken[container.name]}"
                )
            taken[container.name] = path.removesuffix(".name")
    specs: list[tuple[ContainerSpec, ...]] = []
    for prefix, group in groups:
        built = []
        for index, container in enumerate(group):
            name = container.name or _free_name(prefix, index, taken)
            path = f"{prefix}[{index}]"
            built.append(finish(container.to_spec(name, defaults, path), container, path))
        specs.append(tuple(built))
    init_specs, app_specs = specs
    return app_specs, init_specs


def with_registry(
    spec: ContainerSpec,
    registry_ref: str | None,
    path: str,
    registries: RegistryDirectory,
    pull_secrets: Sequence[Registry] = (),
) -> ContainerSpec:
    """The spec with the image to pull and the registry that pulls it (capsa.model.registry):
    the one ``registry_ref`` names (uuid or name; ``path`` locates it for errors), else one of
    ``pull_secrets`` or ``registries`` on the image's domain."""
    named = None
    if registry_ref is not None:
        named = _registry(registries, registry_ref, f"{path}.registry")
    try:
        image, registry = registries.choose(spec.image, named, pull_secrets)
    except RegistryChoiceError as exc:
        raise TemplateFieldError(f"{path}.image", str(exc)) from None
    if registry is None:
        return spec
    return replace(spec, image=image, registry_id=registry.uuid)


def _registry(registries: RegistryDirectory, ident: str, path: str) -> Registry:
    try:
        return registries.find(ident)
    except RegistryChoiceError as exc:
        raise TemplateFieldError(path, f"{exc} (see /v1/registries)") from None


def _free_name(prefix: str, index: int, taken: dict[str, str]) -> str:
    """A name for a container the template left unnamed: container-N or init-N, never a clash."""
    stem = "init" if prefix == "spec.initContainers" else "container"
    number = index
    while f"{stem}-{number}" in taken:
        number += 1
    name = f"{stem}-{number}"
    taken[name] = f"{prefix}[{index}]"
    return name


def describe_error(error: ErrorDetails, root: str) -> str:
    """A pydantic error as ``path: message``, the path starting at ``root`` (none: ""; the
    whole body is then ``body``)."""
    path = _path(error["loc"], root)
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required field is missing"
    elif kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
    else:
        message = error["msg"]
    return f"{path}: {message}"


def _path(loc: tuple[int | str, ...], root: str) -> str:
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.removeprefix(".") or "body"

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from capsa.api.schemas import TemplateDefaults, TemplateError, parse_create_body
from capsa.model.capsule import CapsuleSpec, PortSpec, PullPolicy, RestartPolicy

DEFAULTS = TemplateDefaults(cpu_millis=250, memory_mb=96, max_containers=4)

ZUN: dict[str, Any] = {
    "kind": "capsule",
    "capsuleVersion": "beta",
    "metadata": {"name": "web", "labels": {"app": "web"}, "annotations": {"note": "n"}},
    "availabilityZone": "nova",
    "spec": {
        "restartPolicy": "OnFailure",
        "initContainers": [{"image": "busybox", "name": "setup", "command": ["true"]}],
        "containers": [
            {
                "image": "nginx:1.25",
                "name": "nginx",
                "command": ["nginx"],
                "args": ["-g", "daemon off;"],
                "workDir": "/srv",
                "env": {"MODE": "prod"},
                "imagePullPolicy": "ifnotpresent",
                "stdin": "true",
                "tty": False,
                "resources": {"requests": {"cpu": 0.5, "memory": 128}},
                "ports": [{"containerPort": 80, "protocol": "TCP", "name": "http"}],
            },
            {"image": "registry.local:5000/team/sidecar@sha256:" + "a" * 64},
        ],
    },
}

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "api", "labels": {"tier": "backend"}},
    "spec": {
        "restartPolicy": "Never",
        "runtimeClassName": "crun",
        "initContainers": [{"name": "migrate", "image": "busybox"}],
        "containers": [
            {
                "name": "app",
                "image": "busybox",
                "command": ["sh", "-c"],
                "args": ["echo hi"],
                "workingDir": "/",
                "env": [{"name": "A", "value": "1"}, {"name": "B"}, {"name": "A", "value": "2"}],
                "imagePullPolicy": "Always",
                "resources": {
                    "requests": {"cpu": "500m", "memory": "64Mi"},
                    "limits": {"memory": "1G"},
                },
                "ports": [{"containerPort": 8080, "hostPort": 18080, "protocol": "UDP"}],
                "stdin": True,
                "tty": True,
            }
        ],
    },
}


def parse(template: Any) -> CapsuleSpec:
    return parse_create_body({"template": template}, DEFAULTS, fallback_name="capsule-generated")


def modified(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value`` (list indexes allowed)."""
    copy_ = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = copy_
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return copy_


def test_a_zun_template_becomes_a_capsule_spec() -> None:
    spec = parse(ZUN)
    assert spec.name == "web"
    assert spec.labels == {"app": "web"}
    assert spec.annotations == {"note": "n"}
    assert spec.restart_policy is RestartPolicy.ON_FAILURE
    assert spec.runtime is None
    [init] = spec.init_containers
    assert (init.name, init.command) == ("setup", ("true",))
    nginx, sidecar = spec.containers
    assert nginx.image == "nginx:1.25"
    assert (nginx.cpu_millis, nginx.memory_mb) == (500, 128)
    assert nginx.command == ("nginx",) and nginx.args == ("-g", "daemon off;")
    assert nginx.workdir == "/srv"
    assert nginx.env == {"MODE": "prod"}
    assert nginx.image_pull_policy is PullPolicy.IF_NOT_PRESENT
    assert nginx.stdin is True and nginx.tty is False
    assert nginx.ports == (PortSpec(container_port=80, protocol="TCP", name="http"),)
    # No requests: the configured defaults; no name: one that is free in the capsule.
    assert (sidecar.cpu_millis, sidecar.memory_mb) == (250, 96)
    assert sidecar.name == "container-1"


def test_a_zun_template_given_as_a_json_string_is_the_same_capsule() -> None:
    assert parse(json.dumps(ZUN)) == parse(ZUN)


def test_a_pod_manifest_becomes_a_capsule_spec() -> None:
    spec = parse(POD)
    assert spec.name == "api"
    assert spec.restart_policy is RestartPolicy.NEVER
    assert spec.runtime == "crun"
    assert [c.name for c in spec.init_containers] == ["migrate"]
    [app] = spec.containers
    assert app.command == ("sh", "-c") and app.args == ("echo hi",)
    assert app.workdir == "/"
    # Later entries win, as in Kubernetes; a variable without value is empty.
    assert app.env == {"A": "2", "B": ""}
    assert app.image_pull_policy is PullPolicy.ALWAYS
    # cpu from the request (no limit); memory from the limit: 10**9 bytes rounded up to MiB.
    assert app.cpu_millis == 500
    assert app.memory_mb == 954
    assert app.ports == (PortSpec(container_port=8080, protocol="UDP", host_port=18080),)
    assert app.stdin and app.tty


ZUN_PRIVILEGED = "spec.containers.0.privileged"
POD_SECURITY = "spec.containers.0.securityContext"


@pytest.mark.parametrize(
    ("template", "path", "value", "privileged"),
    [
        (ZUN, ZUN_PRIVILEGED, True, True),
        (ZUN, ZUN_PRIVILEGED, "true", True),
        (ZUN, ZUN_PRIVILEGED, "False", False),
        (POD, POD_SECURITY, {"privileged": True}, True),
        (POD, POD_SECURITY, {"privileged": False}, False),
        (POD, POD_SECURITY, {}, False),
    ],
)
def test_privileged_containers(template: Any, path: str, value: Any, privileged: bool) -> None:
    spec = parse(modified(template, path, value))
    assert spec.containers[0].privileged is privileged
    assert spec.privileged is privileged
    assert not any(c.privileged for c in (*spec.init_containers, *spec.containers[1:]))
    assert not parse(template).privileged


def test_a_privileged_init_container_makes_the_capsule_privileged() -> None:
    spec = parse(modified(ZUN, "spec.initContainers.0.privileged", True))
    assert spec.init_containers[0].privileged and spec.privileged


@pytest.mark.parametrize(
    ("cpu", "memory", "millis", "mebibytes"),
    [
        (1, 67108864, 1000, 64),
        (0.25, "128Mi", 250, 128),
        ("2", "1Gi", 2000, 1024),
        ("100m", "500M", 100, 477),
        ("0.0001", "1Ki", 1, 1),
        ("1e-1", "2e6", 100, 2),
    ],
)
def test_pod_quantities(cpu: Any, memory: Any, millis: int, mebibytes: int) -> None:
    template = modified(
        POD, "spec.containers.0.resources", {"limits": {"cpu": cpu, "memory": memory}}
    )
    [app] = parse(template).containers
    assert (app.cpu_millis, app.memory_mb) == (millis, mebibytes)


def test_zun_cpu_and_memory_may_be_strings_of_numbers() -> None:
    template = modified(
        ZUN, "spec.containers.0.resources.requests", {"cpu": "1.5", "memory": "256"}
    )
    assert (parse(template).containers[0].cpu_millis, parse(template).containers[0].memory_mb) == (
        1500,
        256,
    )


def test_a_virtual_kubelet_container_gets_defaults_for_what_it_leaves_empty() -> None:
    template = modified(
        ZUN,
        "spec.containers",
        [
            {
                "image": "nginx",
                "command": None,
                "workDir": "",
                "imagePullPolicy": "IfNotPresent",
                "env": {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
                "resources": {},
            }
        ],
    )
    [container] = parse(json.dumps(template)).containers
    assert container.workdir is None
    assert (container.cpu_millis, container.memory_mb) == (250, 96)
    assert container.command == ()


def test_a_template_without_name_gets_the_fallback_name() -> None:
    template = modified(ZUN, "metadata", {})
    assert parse(template).name == "capsule-generated"


def test_the_deprecated_top_level_restart_policy_applies_when_spec_has_none() -> None:
    template = copy.deepcopy(ZUN)
    del template["spec"]["restartPolicy"]
    template["restartPolicy"] = "Never"
    assert parse(template).restart_policy is RestartPolicy.NEVER
    del template["restartPolicy"]
    assert parse(template).restart_policy is RestartPolicy.ALWAYS


def test_generated_container_names_never_clash_with_given_ones() -> None:
    template = modified(
        ZUN,
        "spec.containers",
        [{"image": "busybox"}, {"image": "busybox", "name": "container-0"}],
    )
    assert [c.name for c in parse(template).containers] == ["container-1", "container-0"]


BAD_TEMPLATES: list[tuple[str, Any, list[str]]] = [
    ("no containers", modified(ZUN, "spec.containers", []), ["template.spec.containers"]),
    (
        "unknown top-level key",
        modified(ZUN, "replicas", 3),
        ["template.replicas: unknown field"],
    ),
    (
        "unknown deep key",
        modified(ZUN, "spec.containers.0.resources.requests.gpu", 1),
        ["template.spec.containers[0].resources.requests.gpu: unknown field"],
    ),
    (
        "unknown pod key",
        modified(POD, "spec.containers.0.env.0.valueFrom", {"secretKeyRef": {}}),
        ["template.spec.containers[0].env[0].valueFrom: unknown field"],
    ),
    (
        "security settings capsa does not apply",
        modified(POD, "spec.containers.0.securityContext", {"runAsUser": 0}),
        ["template.spec.containers[0].securityContext.runAsUser: unknown field"],
    ),
    (
        "privileged that is not a boolean",
        modified(ZUN, "spec.containers.0.privileged", "yes please"),
        ["template.spec.containers[0].privileged"],
    ),
    (
        "bad container name",
        modified(ZUN, "spec.containers.0.name", "-bad name"),
        ["template.spec.containers[0].name", "not a valid name"],
    ),
    (
        "duplicate container name across init and app containers",
        modified(ZUN, "spec.containers.0.name", "setup"),
        ["template.spec.containers[0].name", "spec.initContainers[0]"],
    ),
    (
        "bad image",
        modified(ZUN, "spec.containers.0.image", "Nginx:latest"),
        ["template.spec.containers[0].image", "not a valid image name"],
    ),
    ("missing image", modified(POD, "spec.containers.0.image", None), ["containers[0].image"]),
    (
        "bad restart policy",
        modified(ZUN, "spec.restartPolicy", "Sometimes"),
        ["template.spec.restartPolicy"],
    ),
    (
        "bad pull policy",
        modified(ZUN, "spec.containers.0.imagePullPolicy", "Sometimes"),
        ["template.spec.containers[0].imagePullPolicy", "Always, IfNotPresent or Never"],
    ),
    (
        "pod pull policy is case sensitive",
        modified(POD, "spec.containers.0.imagePullPolicy", "always"),
        ["template.spec.containers[0].imagePullPolicy"],
    ),
    (
        "negative cpu",
        modified(ZUN, "spec.containers.0.resources.requests.cpu", -1),
        ["template.spec.containers[0].resources.requests.cpu", "greater than zero"],
    ),
    (
        "zero memory",
        modified(ZUN, "spec.containers.0.resources.requests.memory", 0),
        ["template.spec.containers[0].resources.requests.memory", "greater than zero"],
    ),
    (
        "fractional zun memory",
        modified(ZUN, "spec.containers.0.resources.requests.memory", "64Mi"),
        ["template.spec.containers[0].resources.requests.memory", "MiB"],
    ),
    (
        "boolean cpu",
        modified(ZUN, "spec.containers.0.resources.requests.cpu", True),
        ["template.spec.containers[0].resources.requests.cpu"],
    ),
    (
        "zero pod cpu",
        modified(POD, "spec.containers.0.resources.limits", {"cpu": "0m"}),
        ["template.spec.containers[0].resources.limits.cpu", "greater than zero"],
    ),
    (
        "bad pod quantity",
        modified(POD, "spec.containers.0.resources.requests.memory", "64 MB"),
        ["template.spec.containers[0].resources.requests.memory", "quantity"],
    ),
    (
        "request above limit",
        modified(POD, "spec.containers.0.resources.requests.memory", "2G"),
        ["template.spec.containers[0].resources.requests.memory", "limits.memory"],
    ),
    (
        "non-string label",
        modified(ZUN, "metadata.labels.replicas", 3),
        ["template.metadata.labels.replicas"],
    ),
    (
        "non-string env value",
        modified(ZUN, "spec.containers.0.env.PORT", 8080),
        ["template.spec.containers[0].env.PORT"],
    ),
    (
        "non-string pod env value",
        modified(POD, "spec.containers.0.env.0.value", 1),
        ["template.spec.containers[0].env[0].value"],
    ),
    (
        "command not a list of strings",
        modified(ZUN, "spec.containers.0.command", "nginx -g"),
        ["template.spec.containers[0].command"],
    ),
    (
        "too many containers",
        modified(ZUN, "spec.containers", [{"image": "busybox"}] * 4),
        ["template.spec", "5 containers", "at most 4"],
    ),
    (
        "volumes",
        modified(ZUN, "spec.volumes", [{"name": "data", "cinder": {"size": 1}}]),
        ["template.spec.volumes", "not supported yet"],
    ),
    (
        "volume mounts",
        modified(POD, "spec.containers.0.volumeMounts", [{"name": "d", "mountPath": "/d"}]),
        ["template.spec.containers[0].volumeMounts", "not supported yet"],
    ),
    (
        "port out of range",
        modified(ZUN, "spec.containers.0.ports.0.containerPort", 70000),
        ["template.spec.containers[0].ports[0].containerPort"],
    ),
    (
        "bad protocol",
        modified(ZUN, "spec.containers.0.ports.0.protocol", "SCTP"),
        ["template.spec.containers[0].ports[0].protocol"],
    ),
    ("bad kind", modified(ZUN, "kind", "Deployment"), ["template.kind", "'capsule'", "'Pod'"]),
    ("bad api version", modified(POD, "apiVersion", "apps/v1"), ["template.apiVersion"]),
    ("missing metadata", {"kind": "capsule", "spec": ZUN["spec"]}, ["template.metadata"]),
    ("bad capsule name", modified(ZUN, "metadata.name", "a b"), ["template.metadata.name"]),
    ("template is a list", [ZUN], ["template: must be an object"]),
    ("template is YAML", "kind: capsule\nspec: {}\n", ["template:", "must be JSON"]),
]


@pytest.mark.parametrize(
    ("template", "fragments"),
    [pytest.param(t, f, id=name) for name, t, f in BAD_TEMPLATES],
)
def test_bad_templates_are_refused_naming_the_field(template: Any, fragments: list[str]) -> None:
    with pytest.raises(TemplateError) as caught:
        parse(template)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    template = modified(ZUN, "spec.containers.0.image", "BAD")
    template["spec"]["containers"][0]["resources"]["requests"]["cpu"] = -2
    with pytest.raises(TemplateError) as caught:
        parse(template)
    assert "containers[0].image" in str(caught.value)
    assert "containers[0].resources.requests.cpu" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "must be a JSON object"),
        ({}, "template: required field is missing"),
        ({"template": ZUN, "nets": []}, "unknown field(s) in the request body: nets"),
    ],
)
def test_bad_bodies_are_refused(body: Any, fragment: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_create_body(body, DEFAULTS, fallback_name="x")
    assert fragment in str(caught.value)

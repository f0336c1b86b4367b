from __future__ import annotations

import dataclasses
import random
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import pytest

from capsa.cni.protocol import (
    REQUIRED_ENVIRONMENT,
    SUPPORTED_VERSIONS,
    CniError,
    CniRequest,
    ErrorCode,
    attachment_owner,
    build_result,
    decode_header,
    parse_cni_args,
    parse_config,
    parse_request,
    prev_result_problems,
    version_tuple,
)
from capsa.network.types import Link, PluggedPort, PortBinding

CONTAINERD_ARGS = {
    "IgnoreUnknown": "1",
    "K8S_POD_NAMESPACE": "default",
    "K8S_POD_NAME": "5f0c6a52-0d7e-4bb4-8f43-1b1a3c0e9d11",
    "K8S_POD_INFRA_CONTAINER_ID": "a3f9c1d2e4b5a69788776655443322110f",
    "K8S_POD_UID": "0b7d3c1e-2f4a-4c5b-9d6e-7f8a9b0c1d2e",
}


def envelope(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "containerId": "a3f9c1d2e4b5",
        "netns": "/var/run/netns/cni-1234",
        "ifname": "eth0",
        "args": "IgnoreUnknown=1;K8S_POD_NAME=pod-1",
        "path": "/opt/cni/bin",
        "config": {"cniVersion": "1.0.0", "name": "capsa", "type": "capsa-cni"},
    }
    base.update(overrides)
    return base


_VARIABLES = {
    "containerId": "CNI_CONTAINERID",
    "netns": "CNI_NETNS",
    "ifname": "CNI_IFNAME",
    "args": "CNI_ARGS",
    "path": "CNI_PATH",
}


def parse(command: str, call: dict[str, Any]) -> CniRequest:
    """parse_request of a call written as an envelope: its variables and its config."""
    environment = {variable: call[key] for key, variable in _VARIABLES.items() if key in call}
    return parse_request(command, environment, call["config"])


def config(**keys: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "capsa", "type": "capsa-cni", **keys}


def network_envelope(**keys: Any) -> dict[str, Any]:
    """What capsa-cni forwards for GC or STATUS: no attachment, a 1.1.0 config."""
    return envelope(
        containerId="",
        netns="",
        ifname="",
        args="",
        config=config(**{"cniVersion": "1.1.0", **keys}),
    )


def plugged() -> list[PluggedPort]:
    return [
        PluggedPort(
            bridge=Link("capsa0", "02:00:00:00:00:01"),
            host_end=Link("capsa0123456789", "02:00:00:00:00:02"),
            pod_end=Link("eth0", "fa:16:3e:00:00:03"),
            netns="/var/run/netns/cni-1234",
            address=IPv4Interface("10.217.0.5/16"),
            gateway=IPv4Address("10.217.0.1"),
            mtu=1450,
        )
    ]


def plugged_on_two_networks() -> list[PluggedPort]:
    return [
        *plugged(),
        PluggedPort(
            bridge=Link("capsa1", "02:00:00:00:01:01"),
            host_end=Link("capsa1123456789", "02:00:00:00:01:02"),
            pod_end=Link("eth1", "fa:16:3e:00:01:03"),
            netns="/var/run/netns/cni-1234",
            address=IPv4Interface("10.218.0.7/24"),
            gateway=IPv4Address("10.218.0.1"),
            mtu=1400,
        ),
    ]


PORT = PortBinding(
    port_id="port-1",
    network_id="net-1",
    mac="fa:16:3e:00:00:03",
    ip=IPv4Interface("10.217.0.5/16"),
    gateway=IPv4Address("10.217.0.1"),
    bridge="capsa0",
    mtu=1450,
)


@pytest.mark.parametrize("seed", range(8))
def test_cni_args_in_any_order(seed: int) -> None:
    pairs = [f"{k}={v}" for k, v in CONTAINERD_ARGS.items()]
    random.Random(seed).shuffle(pairs)
    assert parse_cni_args(";".join(pairs)) == CONTAINERD_ARGS


def test_cni_args_empty_and_stray_separators() -> None:
    assert parse_cni_args("") == {}
    assert parse_cni_args("IgnoreUnknown=1;;K8S_POD_NAME=p;") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "p",
    }


def test_cni_args_value_may_hold_equals_or_be_empty() -> None:
    assert parse_cni_args("A=b=c;B=") == {"A": "b=c", "B": ""}


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("IgnoreUnknown=1;K8S_POD_NAME", "K8S_POD_NAME"),
        ("=value;K8S_POD_NAME=p", "=value"),
        ("K8S_POD_NAME=a;K8S_POD_NAME=b", "K8S_POD_NAME"),
    ],
)
def test_cni_args_bad_pairs_name_the_part(text: str, bad_part: str) -> None:
    with pytest.raises(CniError) as caught:
        parse_cni_args(text)
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert bad_part in caught.value.msg


def test_parse_request_reads_every_field() -> None:
    request = parse("ADD", envelope())
    assert request.command == "ADD"
    assert request.container_id == "a3f9c1d2e4b5"
    assert request.netns == "/var/run/netns/cni-1234"
    assert request.ifname == "eth0"
    assert request.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "pod-1"}
    assert request.pod_name == "pod-1"
    assert request.cni_version == "1.0.0"
    assert request.network_config["name"] == "capsa"
    assert request.prev_result is None


@pytest.mark.parametrize(
    ("command", "variable"),
    [(c, v) for c, variables in REQUIRED_ENVIRONMENT.items() for v in variables],
)
def test_parse_request_names_missing_variables(command: str, variable: str) -> None:
    key = {
        "CNI_CONTAINERID": "containerId",
        "CNI_NETNS": "netns",
        "CNI_IFNAME": "ifname",
        "CNI_PATH": "path",
    }
    body = envelope(config=config(cniVersion="1.1.0"), **{key[variable]: ""})
    with pytest.raises(CniError) as caught:
        parse(command, body)
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert variable in caught.value.msg


def test_del_needs_no_netns() -> None:
    assert parse("DEL", envelope(netns="")).netns == ""


@pytest.mark.parametrize("container_id", ["-abc", "a b", "abc/def", "é1"])
def test_parse_request_refuses_bad_container_ids(container_id: str) -> None:
    with pytest.raises(CniError) as caught:
        parse("ADD", envelope(containerId=container_id))
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert "CNI_CONTAINERID" in caught.value.msg


@pytest.mark.parametrize("ifname", ["eth0/1", "a" * 16, "..", "et h0"])
def test_parse_request_refuses_unusable_ifnames(ifname: str) -> None:
    with pytest.raises(CniError) as caught:
        parse("ADD", envelope(ifname=ifname))
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert "CNI_IFNAME" in caught.value.msg


@pytest.mark.parametrize(
    ("command", "body", "code"),
    [
        ("VERSION", envelope(), ErrorCode.INVALID_ENVIRONMENT),
        ("ADD", envelope(config=config(cniVersion="2.0.0")), ErrorCode.INCOMPATIBLE_VERSION),
        ("ADD", envelope(config=config(cniVersion="0.2.0")), ErrorCode.INCOMPATIBLE_VERSION),
        ("ADD", envelope(config={"name": "capsa"}), ErrorCode.INCOMPATIBLE_VERSION),
        ("ADD", envelope(config=config(prevResult=[])), ErrorCode.INVALID_NETWORK_CONFIG),
        (
            "ADD",
            envelope(config=config(prevResult={"ips": "x"})),
            ErrorCode.INVALID_NETWORK_CONFIG,
        ),
        ("ADD", envelope(config=config(dns="x")), ErrorCode.INVALID_NETWORK_CONFIG),
        ("ADD", envelope(config=config(runtimeConfig=[])), ErrorCode.INVALID_NETWORK_CONFIG),
        ("ADD", envelope(config=config(name="")), ErrorCode.INVALID_NETWORK_CONFIG),
        ("ADD", envelope(config=config(name="bad/name")), ErrorCode.INVALID_NETWORK_CONFIG),
        ("DEL", envelope(config=config(name=None)), ErrorCode.INVALID_NETWORK_CONFIG),
        ("ADD", envelope(config=config(ipam={"type": "dhcp"})), ErrorCode.UNSUPPORTED_FIELD),
        (
            "CHECK",
            envelope(config=config(runtimeConfig={"mac": "02:00:00:00:00:01"})),
            ErrorCode.UNSUPPORTED_FIELD,
        ),
        ("ADD", envelope(args="K8S_POD_NAME"), ErrorCode.INVALID_ENVIRONMENT),
        ("CHECK", envelope(config=config(cniVersion="0.3.1")), ErrorCode.INCOMPATIBLE_VERSION),
        ("GC", network_envelope(cniVersion="1.0.0"), ErrorCode.INCOMPATIBLE_VERSION),
        ("STATUS", network_envelope(cniVersion="0.4.0"), ErrorCode.INCOMPATIBLE_VERSION),
        ("GC", network_envelope(), ErrorCode.INVALID_NETWORK_CONFIG),
        ("GC", {**network_envelope(), "path": ""}, ErrorCode.INVALID_ENVIRONMENT),
    ],
)
def test_parse_request_error_codes(command: str, body: dict[str, Any], code: int) -> None:
    with pytest.raises(CniError) as caught:
        parse(command, body)
    assert caught.value.code == code


def test_unsupported_field_names_key_and_value() -> None:
    body = envelope(config=config(runtimeConfig={"bandwidth": {"ingressRate": 100}}))
    with pytest.raises(CniError) as caught:
        parse("ADD", body)
    assert "bandwidth" in caught.value.msg
    assert "ingressRate" in caught.value.msg


def test_declared_capabilities_and_unknown_keys_are_accepted() -> None:
    # portMappings is the capability capsa's conflist declares; other keys pass through
    # (cniVersions of a 1.1.0 conflist, keys of older conflists such as daemon and timeout).
    body = envelope(
        config=config(
            runtimeConfig={"portMappings": [{"hostPort": 8080, "containerPort": 80}]},
            cniVersions=["0.4.0", "1.0.0", "1.1.0"],
            daemon="unix:/run/capsa/cni.sock",
            timeout=5,
        )
    )
    assert parse("ADD", body).network_name == "capsa"


@pytest.mark.parametrize(
    "keys", [{"ipam": {"type": "dhcp"}}, {"prevResult": []}, {"runtimeConfig": {"mac": "x"}}]
)
def test_del_is_not_refused_for_keys_it_does_not_read(keys: dict[str, Any]) -> None:
    assert parse("DEL", envelope(config=config(**keys))).ifname == "eth0"


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_and_del_exist_in_every_version(version: str) -> None:
    for command in ("ADD", "DEL"):
        assert parse(command, envelope(config=config(cniVersion=version)))


def test_gc_reads_the_valid_attachments() -> None:
    body = network_envelope(
        **{
            "cni.dev/valid-attachments": [
                {"containerID": "a1", "ifname": "eth0"},
                {"containerID": "b2", "ifname": "net1"},
            ]
        }
    )
    request = parse("GC", body)
    assert request.valid_attachments == {("a1", "eth0"), ("b2", "net1")}
    assert (request.container_id, request.netns, request.ifname) == ("", "", "")


def test_gc_reads_libcni_legacy_key() -> None:
    body = network_envelope(**{"cni.dev/attachments": [{"containerID": "a1", "ifname": "eth0"}]})
    assert parse("GC", body).valid_attachments == {("a1", "eth0")}


def test_status_needs_no_attachment() -> None:
    assert parse_request("STATUS", {}, config(cniVersion="1.1.0")).command == "STATUS"


def test_owner_separates_daemons_and_networks() -> None:
    owner = attachment_owner
    assert owner("unix:/a.sock", "capsa") == owner("unix:/a.sock", "capsa")
    assert owner("unix:/a.sock", "capsa") != owner("unix:/b.sock", "capsa")
    assert owner("unix:/a.sock", "capsa") != owner("unix:/a.sock", "other")
    assert " " not in owner("unix:/a.sock", "capsa")


@pytest.mark.parametrize(
    "body", [b"", b'{"cniVersion": "1.0.0",', b'{"a": 1} trailing', b"\xff\xfe{}", b"[1, 2]"]
)
def test_a_config_that_is_no_json_object_is_code_6(body: bytes) -> None:
    with pytest.raises(CniError) as caught:
        parse_config(body)
    assert caught.value.code == ErrorCode.DECODING_FAILURE
    assert "network config on stdin" in caught.value.msg


def test_a_config_is_read_as_it_came() -> None:
    assert parse_config(b' {"cniVersion": "1.0.0", "b": "\\u00e9"} ') == {
        "cniVersion": "1.0.0",
        "b": "\u00e9",
    }


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("/var/run/netns/cni-1", "/var/run/netns/cni-1"),
        ("a%20b%25c", "a b%c"),
        ("%C3%A9", "\u00e9"),
        # Not UTF-8: kept as os.environ keeps such bytes.
        ("%FF", "\udcff"),
    ],
)
def test_header_values_are_percent_decoded(header: str, value: str) -> None:
    assert decode_header(header) == value


def test_version_tuple_orders_versions() -> None:
    assert sorted(SUPPORTED_VERSIONS, key=version_tuple) == list(SUPPORTED_VERSIONS)
    assert version_tuple("0.10.0") > version_tuple("0.4.0")


def test_error_object() -> None:
    error = CniError(ErrorCode.TRY_AGAIN_LATER, "daemon busy", "retry")
    assert error.to_dict("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "daemon busy",
        "details": "retry",
    }


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_shape_per_version(version: str) -> None:
    result = build_result(version, plugged(), dns={"nameservers": ["10.217.0.1"]})
    assert result["cniVersion"] == version
    interfaces = [
        {"name": "capsa0", "mac": "02:00:00:00:00:01"},
        {"name": "capsa0123456789", "mac": "02:00:00:00:00:02"},
        {"name": "eth0", "mac": "fa:16:3e:00:00:03", "sandbox": "/var/run/netns/cni-1234"},
    ]
    # 1.1.0 added the interfaces' MTU.
    if version == "1.1.0":
        interfaces = [{**interface, "mtu": 1450} for interface in interfaces]
    assert result["interfaces"] == interfaces
    (ip,) = result["ips"]
    assert result["interfaces"][ip["interface"]]["name"] == "eth0"
    assert ip["address"] == "10.217.0.5/16"
    assert ip["gateway"] == "10.217.0.1"
    # 0.3.x and 0.4.0 carry the IP version; 1.0.0 dropped it.
    assert ip.get("version") == ("4" if version in ("0.3.0", "0.3.1", "0.4.0") else None)
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.217.0.1"}]
    assert result["dns"] == {"nameservers": ["10.217.0.1"]}


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_of_a_pod_on_two_networks_lists_both_and_routes_by_the_first(
    version: str,
) -> None:
    result = build_result(version, plugged_on_two_networks())

    names = [i["name"] for i in result["interfaces"]]
    assert names == ["capsa0", "capsa0123456789", "eth0", "capsa1", "capsa1123456789", "eth1"]
    assert [(names[ip["interface"]], ip["address"], ip["gateway"]) for ip in result["ips"]] == [
        ("eth0", "10.217.0.5/16", "10.217.0.1"),
        ("eth1", "10.218.0.7/24", "10.218.0.1"),
    ]
    assert result["interfaces"][5]["sandbox"] == "/var/run/netns/cni-1234"
    if version == "1.1.0":
        assert [i["mtu"] for i in result["interfaces"]] == [1450] * 3 + [1400] * 3
    # The second network's subnet is routed by its address: the one route is the default.
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.217.0.1"}]
    second = dataclasses.replace(
        PORT, port_id="port-2", mac="fa:16:3e:00:01:03", ip=IPv4Interface("10.218.0.7/24")
    )
    assert prev_result_problems(result, "/var/run/netns/cni-1234", "eth1", second) == []
    assert prev_result_problems(result, "/var/run/netns/cni-1234", "eth0", PORT) == []


def test_result_appends_to_prev_result() -> None:
    prev: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "other0", "mac": "02:00:00:00:00:09"}],
        "ips": [{"address": "192.168.9.2/24", "interface": 0}],
        "routes": [{"dst": "192.168.0.0/16"}],
        "dns": {"nameservers": ["192.168.9.1"]},
    }
    result = build_result("1.0.0", plugged(), prev_result=prev)
    assert result["interfaces"][0] == prev["interfaces"][0]
    assert len(result["interfaces"]) == 4
    assert result["ips"][0] == prev["ips"][0]
    assert result["interfaces"][result["ips"][1]["interface"]]["name"] == "eth0"
    assert result["routes"] == [{"dst": "192.168.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.217.0.1"}]
    # Without DNS of its own the result keeps the previous plugin's.
    assert result["dns"] == {"nameservers": ["192.168.9.1"]}


def test_result_refuses_versions_it_cannot_produce() -> None:
    with pytest.raises(CniError) as caught:
        build_result("0.2.0", plugged())
    assert caught.value.code == ErrorCode.INCOMPATIBLE_VERSION


def test_result_refuses_malformed_prev_result() -> None:
    with pytest.raises(CniError) as caught:
        build_result("1.0.0", plugged(), prev_result={"interfaces": {"name": "x"}})
    assert caught.value.code == ErrorCode.INVALID_NETWORK_CONFIG
    assert "prevResult.interfaces" in caught.value.msg


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_own_result_passes_check(version: str) -> None:
    prev = build_result(version, plugged())
    assert prev_result_problems(prev, "/var/run/netns/cni-1234", "eth0", PORT) == []


def test_check_finds_the_pod_end_after_other_plugins_entries() -> None:
    prev = build_result(
        "1.0.0",
        plugged(),
        prev_result={"interfaces": [{"name": "eth0", "sandbox": "/other"}], "ips": []},
    )
    assert prev_result_problems(prev, "/var/run/netns/cni-1234", "eth0", PORT) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r["interfaces"].pop(), "lists no interface eth0"),
        (lambda r: r["interfaces"][2].update(sandbox="/elsewhere"), "lists no interface eth0"),
        (lambda r: r["interfaces"][2].update(mac="02:99:99:99:99:99"), "MAC 02:99:99:99:99:99"),
        (lambda r: r["ips"][0].update(address="10.217.0.6/16"), "10.217.0.6/16"),
        (lambda r: r["ips"][0].update(interface=1), "the addresses []"),
    ],
)
def test_check_names_what_prev_result_disagrees_on(change: Any, problem: str) -> None:
    prev = build_result("1.0.0", plugged())
    change(prev)
    problems = prev_result_problems(prev, "/var/run/netns/cni-1234", "eth0", PORT)
    assert len(problems) == 1
    assert problem in problems[0]

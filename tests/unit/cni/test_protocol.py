from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import pytest

from capsa.cni.protocol import (
    REQUIRED_ENVIRONMENT,
    SUPPORTED_VERSIONS,
    CniError,
    ErrorCode,
    build_result,
    parse_cni_args,
    parse_request,
)
from capsa.network.types import Link, PluggedPort

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


def plugged() -> PluggedPort:
    return PluggedPort(
        bridge=Link("capsa0", "02:00:00:00:00:01"),
        host_end=Link("capsa0123456789", "02:00:00:00:00:02"),
        pod_end=Link("eth0", "fa:16:3e:00:00:03"),
        netns="/var/run/netns/cni-1234",
        address=IPv4Interface("10.217.0.5/16"),
        gateway=IPv4Address("10.217.0.1"),
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
    request = parse_request("ADD", envelope())
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
    key = {"CNI_CONTAINERID": "containerId", "CNI_NETNS": "netns", "CNI_IFNAME": "ifname"}
    with pytest.raises(CniError) as caught:
        parse_request(command, envelope(**{key[variable]: ""}))
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert variable in caught.value.msg


def test_del_needs_no_netns() -> None:
    assert parse_request("DEL", envelope(netns="")).netns == ""


@pytest.mark.parametrize("container_id", ["-abc", "a b", "abc/def", "é1"])
def test_parse_request_refuses_bad_container_ids(container_id: str) -> None:
    with pytest.raises(CniError) as caught:
        parse_request("ADD", envelope(containerId=container_id))
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert "CNI_CONTAINERID" in caught.value.msg


@pytest.mark.parametrize("ifname", ["eth0/1", "a" * 16, "..", "et h0"])
def test_parse_request_refuses_unusable_ifnames(ifname: str) -> None:
    with pytest.raises(CniError) as caught:
        parse_request("ADD", envelope(ifname=ifname))
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert "CNI_IFNAME" in caught.value.msg


@pytest.mark.parametrize(
    ("command", "body", "code"),
    [
        ("GC", envelope(), ErrorCode.INVALID_ENVIRONMENT),
        ("ADD", envelope(config=["not", "an", "object"]), ErrorCode.DECODING_FAILURE),
        ("ADD", envelope(config={"cniVersion": "1.1.0"}), ErrorCode.INCOMPATIBLE_VERSION),
        ("ADD", envelope(config={"name": "capsa"}), ErrorCode.INCOMPATIBLE_VERSION),
        (
            "ADD",
            envelope(config={"cniVersion": "1.0.0", "prevResult": []}),
            ErrorCode.INVALID_NETWORK_CONFIG,
        ),
        (
            "ADD",
            envelope(config={"cniVersion": "1.0.0", "dns": "x"}),
            ErrorCode.INVALID_NETWORK_CONFIG,
        ),
        ("ADD", envelope(args="K8S_POD_NAME"), ErrorCode.INVALID_ENVIRONMENT),
        ("ADD", envelope(ifname=5), ErrorCode.INVALID_ENVIRONMENT),
    ],
)
def test_parse_request_error_codes(command: str, body: dict[str, Any], code: int) -> None:
    with pytest.raises(CniError) as caught:
        parse_request(command, body)
    assert caught.value.code == code


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
    assert result["interfaces"] == [
        {"name": "capsa0", "mac": "02:00:00:00:00:01"},
        {"name": "capsa0123456789", "mac": "02:00:00:00:00:02"},
        {"name": "eth0", "mac": "fa:16:3e:00:00:03", "sandbox": "/var/run/netns/cni-1234"},
    ]
    (ip,) = result["ips"]
    assert result["interfaces"][ip["interface"]]["name"] == "eth0"
    assert ip["address"] == "10.217.0.5/16"
    assert ip["gateway"] == "10.217.0.1"
    # 0.3.x and 0.4.0 carry the IP version; 1.0.0 dropped it.
    assert ("version" in ip) == (version != "1.0.0")
    if version != "1.0.0":
        assert ip["version"] == "4"
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.217.0.1"}]
    assert result["dns"] == {"nameservers": ["10.217.0.1"]}


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

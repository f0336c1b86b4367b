"""The Neutron v2.0 API under /networking/v2.0, on a real store."""

from __future__ import annotations

from typing import Any

from tests.unit.api.api_helpers import Client
from tests.unit.conftest import CapsuleFactory

from capsa.model.capsule import Capsule
from capsa.model.network import Port
from capsa.network.service import NetworkService
from capsa.store import Store, notify

V2 = "/networking/v2.0"


def who(project: str = "p1", roles: str = "member") -> dict[str, str]:
    return {"X-Auth-Token": "t", "X-Project-Id": project, "X-Roles": roles}


ADMIN = who("admin-project", "admin,member")


async def ok(response: Any, status: int = 200) -> Any:
    assert response.status == status, await response.text()
    return await response.json() if status != 204 else None


async def neutron_error(response: Any, status: int, kind: str, *fragments: str) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"NeutronError"}
    error = body["NeutronError"]
    assert set(error) == {"type", "message", "detail"}
    assert error["type"] == kind, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    message: str = error["message"]
    return message


async def make_network(client: Client, name: str = "net", headers: Any = None, **extra: Any) -> Any:
    body = {"network": {"name": name, **extra}}
    response = await client.post(f"{V2}/networks", json=body, headers=headers or who())
    return (await ok(response, 201))["network"]


async def make_subnet(
    client: Client, network_id: str, cidr: str, headers: Any = None, **extra: Any
) -> Any:
    body = {"subnet": {"network_id": network_id, "cidr": cidr, "ip_version": 4, **extra}}
    response = await client.post(f"{V2}/subnets", json=body, headers=headers or who())
    return (await ok(response, 201))["subnet"]


async def test_versions_and_resources_are_discoverable(client: Client) -> None:
    versions = await ok(await client.get("/networking", headers=who()))
    assert versions["versions"][0]["id"] == "v2.0"
    resources = await ok(await client.get(V2, headers=who()))
    assert {r["collection"] for r in resources["resources"]} == {
        "networks",
        "subnets",
        "ports",
        "security-groups",
        "security-group-rules",
    }
    extensions = await ok(await client.get(f"{V2}/extensions", headers=who()))
    assert "security-group" in {e["alias"] for e in extensions["extensions"]}


async def test_network_lifecycle_in_neutrons_shape(client: Client) -> None:
    network = await make_network(client, "blue", mtu=1400)
    assert network["name"] == "blue" and network["mtu"] == 1400
    assert network["project_id"] == network["tenant_id"] == "p1"
    assert network["shared"] is False and network["status"] == "ACTIVE"
    assert network["provider:network_type"] == "vxlan"
    assert network["provider:segmentation_id"] >= 1
    other = await make_network(client, "green")
    assert other["provider:segmentation_id"] != network["provider:segmentation_id"]

    subnet = await make_subnet(client, network["id"], "10.40.0.0/24", dns_nameservers=["10.0.0.53"])
    await make_subnet(client, other["id"], "10.40.1.0/24")
    second = await make_subnet(client, network["id"], "10.40.2.0/24")
    shown = await ok(await client.get(f"{V2}/networks/{network['id']}", headers=who()))
    assert shown["network"]["subnets"] == [subnet["id"], second["id"]]
    await ok(await client.delete(f"{V2}/subnets/{second['id']}", headers=who()), 204)

    renamed = await client.put(
        f"{V2}/networks/{network['id']}", json={"network": {"name": "navy"}}, headers=who()
    )
    assert (await ok(renamed))["network"]["name"] == "navy"
    assert (await ok(renamed))["network"]["subnets"] == [subnet["id"]]
    listed = await ok(
        await client.get(f"{V2}/networks?name=navy&fields=id&fields=name", headers=who())
    )
    assert listed == {"networks": [{"id": network["id"], "name": "navy"}]}

    await ok(await client.delete(f"{V2}/networks/{network['id']}", headers=who()), 204)
    await neutron_error(
        await client.get(f"{V2}/networks/{network['id']}", headers=who()),
        404,
        "NetworkNotFound",
        network["id"],
    )
    await neutron_error(
        await client.get(f"{V2}/subnets/{subnet['id']}", headers=who()), 404, "SubnetNotFound"
    )


async def test_lists_sort_and_page_as_neutron_does(client: Client) -> None:
    for name in ("b", "c", "a"):
        await make_network(client, name)
    first = await ok(
        await client.get(f"{V2}/networks?sort_key=name&sort_dir=asc&limit=2", headers=who())
    )
    assert [n["name"] for n in first["networks"]] == ["a", "b"]
    [link] = first["networks_links"]
    assert link["rel"] == "next" and "limit=2" in link["href"]
    second = await ok(await client.get(link["href"].split(":9517", 1)[1], headers=who()))
    assert [n["name"] for n in second["networks"]] == ["c"]
    assert "networks_links" not in second
    descending = await ok(
        await client.get(f"{V2}/networks?sort_key=name&sort_dir=desc", headers=who())
    )
    assert [n["name"] for n in descending["networks"]] == ["c", "b", "a"]
    bad = await client.get(f"{V2}/networks?marker=nope", headers=who())
    await neutron_error(bad, 400, "HTTPBadRequest", "Marker nope")


async def test_another_projects_network_is_not_found_and_shared_is_admin_only(
    client: Client,
) -> None:
    private = await make_network(client, "mine")
    for method in ("GET", "DELETE"):
        response = await client.request(method, f"{V2}/networks/{private['id']}", headers=who("p2"))
        await neutron_error(response, 404, "NetworkNotFound")
    assert (await ok(await client.get(f"{V2}/networks", headers=who("p2"))))["networks"] == []

    refused = await client.post(
        f"{V2}/networks", json={"network": {"name": "s", "shared": True}}, headers=who()
    )
    await neutron_error(refused, 403, "PolicyNotAuthorized", "shared")
    shared = await make_network(client, "public", headers=ADMIN, shared=True)
    seen = await ok(await client.get(f"{V2}/networks", headers=who("p2")))
    assert [n["id"] for n in seen["networks"]] == [shared["id"]]
    # Seen, but not another project's to change.
    response = await client.delete(f"{V2}/networks/{shared['id']}", headers=who("p2"))
    await neutron_error(response, 403, "PolicyNotAuthorized")
    admin_sees = await ok(await client.get(f"{V2}/networks", headers=ADMIN))
    assert {n["id"] for n in admin_sees["networks"]} == {private["id"], shared["id"]}


async def test_readers_cannot_write(client: Client) -> None:
    response = await client.post(
        f"{V2}/networks", json={"network": {"name": "x"}}, headers=who(roles="reader")
    )
    await neutron_error(response, 403, "PolicyNotAuthorized", "network_change")
    await ok(await client.get(f"{V2}/networks", headers=who(roles="reader")))


async def test_bodies_are_checked(client: Client) -> None:
    response = await client.post(
        f"{V2}/networks", json={"network": {"name": "x", "colour": "red"}}, headers=who()
    )
    await neutron_error(response, 400, "HTTPBadRequest", "Unrecognized attribute(s) 'colour'")
    response = await client.post(f"{V2}/networks", json={"net": {}}, headers=who())
    await neutron_error(response, 400, "HTTPBadRequest", "'network'")
    response = await client.get("/networking/v2.0/routers", headers=who())
    await neutron_error(response, 404, "HTTPNotFound")
    await make_network(client)
    response = await client.get(f"{V2}/networks?colour=red", headers=who())
    await neutron_error(response, 400, "HTTPBadRequest", "colour")


async def test_subnets_check_pools_gateway_and_overlap(client: Client) -> None:
    network = await make_network(client)
    subnet = await make_subnet(
        client,
        network["id"],
        "10.41.0.0/24",
        gateway_ip="10.41.0.254",
        allocation_pools=[{"start": "10.41.0.10", "end": "10.41.0.20"}],
    )
    assert subnet["gateway_ip"] == "10.41.0.254" and subnet["ip_version"] == 4
    assert subnet["allocation_pools"] == [{"start": "10.41.0.10", "end": "10.41.0.20"}]
    default = await make_subnet(client, network["id"], "10.42.0.0/29")
    assert default["gateway_ip"] == "10.42.0.1"
    assert default["allocation_pools"] == [{"start": "10.42.0.2", "end": "10.42.0.6"}]

    def body(**extra: Any) -> dict[str, Any]:
        return {"subnet": {"network_id": network["id"], "ip_version": 4, **extra}}

    overlapping = await client.post(
        f"{V2}/subnets", json=body(cidr="10.41.0.128/25"), headers=who()
    )
    await neutron_error(overlapping, 400, "HTTPBadRequest", "overlaps")
    gateway_in_pool = await client.post(
        f"{V2}/subnets",
        json=body(
            cidr="10.43.0.0/24", allocation_pools=[{"start": "10.43.0.1", "end": "10.43.0.9"}]
        ),
        headers=who(),
    )
    await neutron_error(gateway_in_pool, 400, "HTTPBadRequest", "conflicts with allocation pool")
    beyond = await client.post(
        f"{V2}/subnets",
        json=body(
            cidr="10.44.0.0/24", allocation_pools=[{"start": "10.44.0.5", "end": "10.44.1.9"}]
        ),
        headers=who(),
    )
    await neutron_error(beyond, 400, "HTTPBadRequest", "beyond the subnet cidr")
    ipv6 = await client.post(
        f"{V2}/subnets", json=body(cidr="fd00::/64", ip_version=6), headers=who()
    )
    await neutron_error(ipv6, 400, "HTTPBadRequest")
    foreign = await client.post(f"{V2}/subnets", json=body(cidr="10.45.0.0/24"), headers=who("p2"))
    await neutron_error(foreign, 404, "NetworkNotFound")


async def test_ports_get_addresses_and_default_group_and_release_them(client: Client) -> None:
    network = await make_network(client)
    subnet = await make_subnet(
        client,
        network["id"],
        "10.46.0.0/24",
        allocation_pools=[{"start": "10.46.0.10", "end": "10.46.0.11"}],
    )

    async def port(**extra: Any) -> Any:
        body = {"port": {"network_id": network["id"], **extra}}
        return await client.post(f"{V2}/ports", json=body, headers=who())

    first = (await ok(await port(name="a"), 201))["port"]
    assert first["fixed_ips"] == [{"subnet_id": subnet["id"], "ip_address": "10.46.0.10"}]
    assert first["mac_address"].startswith("fa:16:3e:")
    assert first["status"] == "DOWN" and first["binding:host_id"] == ""
    groups = await ok(await client.get(f"{V2}/security-groups?name=default", headers=who()))
    [default] = groups["security_groups"]
    assert first["security_groups"] == [default["id"]]

    taken = await port(fixed_ips=[{"ip_address": "10.46.0.10"}])
    await neutron_error(taken, 409, "IpAddressAlreadyAllocated", "10.46.0.10")
    same_mac = await port(mac_address=first["mac_address"].upper())
    await neutron_error(same_mac, 409, "MacAddressInUse", first["mac_address"])
    second = (await ok(await port(name="b", security_groups=[]), 201))["port"]
    assert second["security_groups"] == []
    await neutron_error(await port(), 409, "IpAddressGenerationFailure", "No more IP addresses")

    found = await ok(await client.get(f"{V2}/ports?fixed_ips=ip_address=10.46.0.11", headers=who()))
    assert [p["id"] for p in found["ports"]] == [second["id"]]
    in_use = await client.delete(f"{V2}/networks/{network['id']}", headers=who())
    await neutron_error(in_use, 409, "NetworkInUse")

    await ok(await client.delete(f"{V2}/ports/{first['id']}", headers=who()), 204)
    again = (await ok(await port(), 201))["port"]
    assert again["fixed_ips"][0]["ip_address"] == "10.46.0.10"
    await neutron_error(
        await client.get(f"{V2}/ports/{again['id']}", headers=who("p2")), 404, "PortNotFound"
    )


async def capsule_with_port(
    store: Store, make_capsule: CapsuleFactory, pool: str
) -> tuple[Capsule, Port]:
    """A stored capsule of project p1 with the port capsa allocates for it on host h1."""
    capsule = make_capsule()
    await store.capsules.create(capsule)
    [port] = await NetworkService(store, pool, 1500).allocate_ports(capsule.uuid, "p1", "h1")
    return capsule, port


async def test_a_capsules_port_goes_only_with_its_capsule(
    client: Client, store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule, port = await capsule_with_port(store, make_capsule, "10.47.0.0/24")
    listed = await ok(await client.get(f"{V2}/ports?device_id={capsule.uuid}", headers=who()))
    [shown] = listed["ports"]
    assert shown["id"] == port.id and shown["device_owner"] == "compute:capsule"
    assert shown["binding:host_id"] == "h1"
    refused = await client.delete(f"{V2}/ports/{port.id}", headers=who())
    await neutron_error(refused, 409, "PortInUse", capsule.uuid)

    # A capsule's port whose capsule is gone is a port like any other.
    await store.capsules.remove(capsule.uuid)
    [orphan] = await NetworkService(store, "10.47.0.0/24", 1500).allocate_ports(
        capsule.uuid, "p1", "h1"
    )
    await ok(await client.delete(f"{V2}/ports/{orphan.id}", headers=who()), 204)


async def test_security_groups_and_rules(client: Client) -> None:
    created = await client.post(
        f"{V2}/security-groups", json={"security_group": {"name": "web"}}, headers=who()
    )
    web = (await ok(created, 201))["security_group"]
    assert {(r["direction"], r["ethertype"]) for r in web["security_group_rules"]} == {
        ("egress", "IPv4"),
        ("egress", "IPv6"),
    }
    assert len(web["security_group_rules"]) == 2
    assert all(r["remote_group_id"] is r["protocol"] is None for r in web["security_group_rules"])

    async def rule(**fields: Any) -> Any:
        body = {"security_group_rule": {"security_group_id": web["id"], **fields}}
        return await client.post(f"{V2}/security-group-rules", json=body, headers=who())

    http = (
        await ok(
            await rule(
                direction="ingress",
                protocol="tcp",
                port_range_min=80,
                remote_ip_prefix="10.0.0.0/8",
            ),
            201,
        )
    )["security_group_rule"]
    assert (http["port_range_min"], http["port_range_max"]) == (80, 80)
    assert http["remote_ip_prefix"] == "10.0.0.0/8" and http["ethertype"] == "IPv4"
    duplicate = await rule(
        direction="ingress", protocol="tcp", port_range_min=80, remote_ip_prefix="10.0.0.0/8"
    )
    await neutron_error(duplicate, 409, "SecurityGroupRuleExists", http["id"])
    await neutron_error(
        await rule(direction="ingress", protocol="gre", port_range_min=1), 400, "HTTPBadRequest"
    )
    await neutron_error(
        await rule(direction="ingress", protocol="bogus"), 400, "HTTPBadRequest", "not supported"
    )
    await neutron_error(
        await rule(direction="ingress", remote_ip_prefix="fd00::/8"),
        400,
        "HTTPBadRequest",
        "ethertype",
    )
    await neutron_error(await rule(direction="sideways"), 400, "HTTPBadRequest", "direction")
    await neutron_error(
        await rule(direction="ingress", protocol="icmp", port_range_min=300),
        400,
        "HTTPBadRequest",
        "ICMP type",
    )

    shown = await ok(await client.get(f"{V2}/security-groups/{web['id']}", headers=who()))
    assert http["id"] in {r["id"] for r in shown["security_group"]["security_group_rules"]}
    listed = await ok(
        await client.get(f"{V2}/security-group-rules?direction=ingress", headers=who())
    )
    assert http["id"] in {r["id"] for r in listed["security_group_rules"]}
    assert all(r["direction"] == "ingress" for r in listed["security_group_rules"])
    await neutron_error(
        await client.get(f"{V2}/security-group-rules/{http['id']}", headers=who("p2")),
        404,
        "SecurityGroupRuleNotFound",
    )
    await ok(await client.delete(f"{V2}/security-group-rules/{http['id']}", headers=who()), 204)

    network = await make_network(client)
    await make_subnet(client, network["id"], "10.48.0.0/24")
    body = {"port": {"network_id": network["id"], "security_groups": [web["id"]]}}
    await ok(await client.post(f"{V2}/ports", json=body, headers=who()), 201)
    in_use = await client.delete(f"{V2}/security-groups/{web['id']}", headers=who())
    await neutron_error(in_use, 409, "SecurityGroupInUse")
    foreign = {"port": {"network_id": network["id"], "security_groups": [web["id"]]}}
    await neutron_error(
        await client.post(f"{V2}/ports", json=foreign, headers=who("p2")), 404, "NetworkNotFound"
    )
    default = await client.post(
        f"{V2}/security-groups", json={"security_group": {"name": "default"}}, headers=who()
    )
    await neutron_error(default, 409, "SecurityGroupDefaultAlreadyExists")


async def test_listing_groups_makes_the_default_group_once_and_then_only_reads(
    client: Client, store: Store
) -> None:
    agents = store.hub.subscribe(notify.NETWORK)
    first = await ok(await client.get(f"{V2}/security-groups", headers=who()))
    [default] = first["security_groups"]
    assert default["name"] == "default"
    # Made: the network agents were woken (before the answer: a zero wait sees it).
    assert await agents.wait(0)

    again = await ok(await client.get(f"{V2}/security-groups", headers=who()))
    assert again == first
    assert not await agents.wait(0), "a list that changed nothing woke the network agents"


async def test_only_an_admin_binds_a_port_to_a_host_or_a_capsule(client: Client) -> None:
    network = await make_network(client, shared=True, headers=ADMIN)
    await make_subnet(client, network["id"], "10.48.0.0/24", headers=ADMIN)

    async def create(headers: dict[str, str], **extra: Any) -> Any:
        body = {"port": {"network_id": network["id"], **extra}}
        return await client.post(f"{V2}/ports", json=body, headers=headers)

    to_host = await create(who(), **{"binding:host_id": "h1"})
    await neutron_error(to_host, 403, "PolicyNotAuthorized", "create_port:binding:host_id")
    to_capsule = await create(who(), device_id="capsule-x", device_owner="compute:capsule")
    await neutron_error(to_capsule, 403, "PolicyNotAuthorized", "create_port:device_owner")
    # Nothing was made by the refused requests.
    assert (await ok(await client.get(f"{V2}/ports", headers=ADMIN)))["ports"] == []

    bound = (await ok(await create(ADMIN, **{"binding:host_id": "h1"}), 201))["port"]
    assert bound["binding:host_id"] == "h1" and bound["binding:vif_type"] == "bridge"
    plain = (await ok(await create(who(), device_id="capsule-x"), 201))["port"]
    assert plain["binding:host_id"] == "" and plain["binding:vif_type"] == "unbound"

    async def update(port: Any, headers: dict[str, str], **values: Any) -> Any:
        body = {"port": values}
        return await client.put(f"{V2}/ports/{port['id']}", json=body, headers=headers)

    moved = await update(plain, who(), **{"binding:host_id": "h2"})
    await neutron_error(moved, 403, "PolicyNotAuthorized", "update_port:binding:host_id")
    adopted = await update(plain, who(), device_owner="compute:capsule")
    await neutron_error(adopted, 403, "PolicyNotAuthorized", "update_port:device_owner")
    # Sending what the port already has changes nothing, so it needs no admin.
    same = await ok(await update(plain, who(), device_id="capsule-x", name="same"))
    assert same["port"]["name"] == "same"
    rebound = await ok(await update(plain, ADMIN, **{"binding:host_id": "h2"}))
    assert rebound["port"]["binding:host_id"] == "h2"
    unbound = await ok(await update(plain, ADMIN, **{"binding:host_id": ""}))
    assert unbound["port"]["binding:host_id"] == ""


async def test_a_capsules_port_keeps_its_capsule_and_host(
    client: Client, store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule, port = await capsule_with_port(store, make_capsule, "10.49.0.0/24")
    for values in ({"device_id": "other"}, {"device_owner": ""}, {"binding:host_id": "h2"}):
        refused = await client.put(f"{V2}/ports/{port.id}", json={"port": values}, headers=ADMIN)
        await neutron_error(refused, 409, "PortInUse", "follow the capsule")
    renamed = await client.put(
        f"{V2}/ports/{port.id}", json={"port": {"name": "eth0"}}, headers=who()
    )
    assert (await ok(renamed))["port"]["name"] == "eth0"
    [still] = await store.ports.list_for_device(capsule.uuid)
    assert (still.device_id, still.host) == (capsule.uuid, "h1")

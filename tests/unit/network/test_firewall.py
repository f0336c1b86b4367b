from __future__ import annotations

import ipaddress
from dataclasses import replace

from capsa.model.network import (
    Direction,
    EtherType,
    HostNetworkView,
    HostPortMapping,
    LocalPort,
    Network,
    Port,
    SecurityGroupRule,
    Subnet,
)
from capsa.network import firewall
from capsa.network.service import bridge_name

NET_A = Network("11111111-1111-4111-8111-111111111111", "a", "p1", False, True, 1500, 1)
NET_B = Network("22222222-2222-4222-8222-222222222222", "b", "p2", False, True, 1500, 2)
SUB_A = Subnet(
    "sa", NET_A.id, "p1", ipaddress.IPv4Network("10.60.0.0/24"), ipaddress.IPv4Address("10.60.0.1")
)
SUB_B = Subnet(
    "sb", NET_B.id, "p2", ipaddress.IPv4Network("10.60.1.0/24"), ipaddress.IPv4Address("10.60.1.1")
)
GROUP_A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
GROUP_B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
BRIDGES = {NET_A.id: bridge_name(NET_A.id), NET_B.id: bridge_name(NET_B.id)}


def local(port_id: str, network: Network, subnet: Subnet, ip: str, group: str) -> LocalPort:
    port = Port(
        port_id, network.id, subnet.id, network.project_id, ipaddress.IPv4Address(ip),
        "fa:16:3e:00:00:01", f"capsule-{port_id}", "compute:capsule", "ACTIVE", "h1", None, None,
        None, security_group_ids=(group,),
    )  # fmt: skip
    return LocalPort(port, network, subnet)


def rule(group: str, direction: Direction, **fields: object) -> SecurityGroupRule:
    ethertype = fields.pop("ethertype", EtherType.IPV4)
    return SecurityGroupRule(f"r-{len(fields)}", group, "p", direction, ethertype, **fields)  # type: ignore[arg-type]


def render(host_view: HostNetworkView, bridges: dict[str, str] = BRIDGES) -> str:
    """The script that replaces both tables whole, as one transaction runs it."""
    return "".join(
        firewall.script(family, "capsa_t", objects, None)
        for family, objects in firewall.render(host_view, bridges).items()
    )


def view() -> HostNetworkView:
    a = local("33333333-3333-4333-8333-333333333333", NET_A, SUB_A, "10.60.0.2", GROUP_A)
    b = local("44444444-4444-4444-8444-444444444444", NET_B, SUB_B, "10.60.1.2", GROUP_B)
    return HostNetworkView(
        ports=(a, b),
        rules={
            GROUP_A: (
                rule(GROUP_A, Direction.EGRESS),
                rule(GROUP_A, Direction.INGRESS, remote_group_id=GROUP_A),
                rule(GROUP_A, Direction.INGRESS, remote_group_id=GROUP_A, ethertype=EtherType.IPV6),
                rule(
                    GROUP_A,
                    Direction.INGRESS,
                    protocol="tcp",
                    port_range_min=80,
                    port_range_max=81,
                    remote_ip_prefix=ipaddress.IPv4Network("10.60.1.0/24"),
                ),
                rule(GROUP_A, Direction.INGRESS, protocol="icmp", port_range_min=8),
            ),
            GROUP_B: (rule(GROUP_B, Direction.EGRESS, protocol="udp", port_range_min=53),),
        },
        # A member of group A on network B must not open network A's pods to network B.
        members={
            GROUP_A: (
                (NET_A.id, ipaddress.IPv4Address("10.60.0.2")),
                (NET_B.id, ipaddress.IPv4Address("10.60.1.9")),
            )
        },
        remote_ports=(),
    )


NO_INET_TABLE = "table inet capsa_t {}\ndelete table inet capsa_t\n"
NO_BRIDGE_TABLE = "table bridge capsa_t {}\ndelete table bridge capsa_t\n"
NO_TABLES = NO_INET_TABLE + NO_BRIDGE_TABLE


def test_a_table_of_unknown_content_is_replaced_whole() -> None:
    tables = firewall.render(view(), BRIDGES)
    assert list(tables) == ["inet", "bridge"]
    inet = firewall.script("inet", "capsa_t", tables["inet"], None)
    assert inet.startswith(NO_INET_TABLE + "table inet capsa_t {")
    assert inet.count("table inet capsa_t") == 3
    assert "ct state established,related accept" in inet
    # No port bound: the bridge table has nothing to hold.
    assert tables["bridge"] == {}
    assert firewall.script("bridge", "capsa_t", {}, None) == NO_BRIDGE_TABLE


def test_a_known_table_gets_only_what_changed() -> None:
    before = firewall.render(view(), BRIDGES)["inet"]
    assert firewall.script("inet", "capsa_t", before, before) == ""

    # Port b goes, a rule of group A changes, a member of group A leaves.
    a, _ = view().ports
    rules = {GROUP_A: (*view().rules[GROUP_A], rule(GROUP_A, Direction.INGRESS, protocol="tcp"))}
    after_view = replace(view(), ports=(a,), rules=rules, members={GROUP_A: ()})
    after = firewall.render(after_view, BRIDGES)["inet"]
    changes = firewall.script("inet", "capsa_t", after, before)

    flushed = [line for line in changes.splitlines() if line.startswith("flush ")]
    assert flushed == [
        "flush set inet capsa_t members_aaaaaaaaaaaa_111111111111",
        "flush chain inet capsa_t forward",
        "flush chain inet capsa_t input",
        "flush chain inet capsa_t pod_egress",
        "flush chain inet capsa_t pod_ingress",
        "flush chain inet capsa_t port_333333333333_i",
    ]
    # b's chains are deleted last, once nothing jumps to them.
    assert changes.endswith(
        "}\ndelete chain inet capsa_t port_444444444444_i\n"
        "delete chain inet capsa_t port_444444444444_e\n"
    )
    declared = changes.split("table inet capsa_t {\n")[1].split("}\ndelete")[0]
    assert "meta l4proto 6 accept" in declared and "port_333333333333_e {" not in declared
    assert "delete table" not in changes

    # Back to no port: the table goes whole.
    assert firewall.script("inet", "capsa_t", {}, after) == NO_INET_TABLE
    # From none to some: declared whole.
    assert firewall.script("inet", "capsa_t", after, {}) == firewall.script(
        "inet", "capsa_t", after, None
    )


def test_no_port_left_deletes_the_table() -> None:
    empty = HostNetworkView(ports=(), rules={}, members={}, remote_ports=())
    assert render(empty, {}) == NO_TABLES


def test_rules_become_matches_per_port() -> None:
    script = render(view())
    chain_a_in = script.split("chain port_333333333333_i {")[1].split("}")[0]
    assert "ct status dnat accept" in chain_a_in
    set_name = "members_aaaaaaaaaaaa_111111111111"
    assert f"ip saddr @{set_name} accept" in chain_a_in
    assert "ip saddr 10.60.1.0/24 meta l4proto 6 th dport 80-81 accept" in chain_a_in
    assert "meta l4proto 1 icmp type 8 accept" in chain_a_in
    assert chain_a_in.strip().endswith("drop")
    # Remote-group members count only on the port's own network.
    members = script.split(f"set {set_name} {{")[1].split("}")[0]
    assert "10.60.0.2" in members and "10.60.1.9" not in members
    chain_b_out = script.split("chain port_444444444444_e {")[1].split("}")[0]
    assert "meta l4proto 17 th dport 53 return" in chain_b_out
    assert "ip6" not in script


def test_networks_cannot_reach_each_others_gateways() -> None:
    script = render(view())
    assert f'iifname "{BRIDGES[NET_A.id]}" ip daddr {{ 10.60.1.1 }} drop' in script
    assert f'iifname "{BRIDGES[NET_B.id]}" ip daddr {{ 10.60.0.1 }} drop' in script


def test_host_ports_are_dnated_to_their_pod() -> None:
    mapping = HostPortMapping("33333333-3333-4333-8333-333333333333", 8080, 80, "tcp")
    gone = HostPortMapping("no-such-port", 9090, 90, "tcp")
    script = render(replace(view(), host_ports=(mapping, gone)))
    assert "meta l4proto tcp th dport 8080 dnat ip to 10.60.0.2:80" in script
    assert "9090" not in script
    assert "type nat hook prerouting" in script and "type nat hook output" in script
    assert "dnat ip to" not in render(view())


def test_bound_ports_cannot_send_from_another_mac_or_address() -> None:
    unbound = view()
    assert "table bridge capsa_t {\n" not in render(unbound)
    first = unbound.ports[0]
    bound_port = replace(first.port, binding_host_ifname="capsa0123456789")
    bound = replace(unbound, ports=(replace(first, port=bound_port), *unbound.ports[1:]))
    script = render(bound)
    bridge_table = script.split("table bridge capsa_t {\n")[1]
    assert '"capsa0123456789" : jump port_333333333333_s' in bridge_table
    chain = bridge_table.split("chain port_333333333333_s {")[1].split("}")[0]
    assert "ether saddr != fa:16:3e:00:00:01 drop" in chain
    assert "ip saddr != 10.60.0.2 drop" in chain and "arp saddr ip != 10.60.0.2 drop" in chain
    assert "port_444444444444_s" not in script


def test_a_port_set_down_passes_nothing_not_even_established_traffic() -> None:
    assert "ct state established,related accept" in render(view())
    first, second = view().ports
    down = replace(first, port=replace(first.port, admin_state_up=False))
    script = render(replace(view(), ports=(down, second)))
    forward = script.split("chain forward {")[1].split("chain input {")[0]
    bridge = BRIDGES[NET_A.id]
    drop_in = f'oifname . ip daddr {{ "{bridge}" . 10.60.0.2 }} drop'
    assert f'iifname . ip saddr {{ "{bridge}" . 10.60.0.2 }} drop' in forward
    assert forward.index(drop_in) < forward.index("ct state established,related accept")
    assert "10.60.1.2 }" not in forward


def test_table_names_differ_per_instance() -> None:
    first, second = firewall.table_name("/var/lib/capsa"), firewall.table_name("/srv/capsa")
    assert first != second and first.startswith("capsa_")

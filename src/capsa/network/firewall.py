"""The nftables ruleset that isolates a host's networks and enforces its ports' security groups.

capsa owns two tables, ``inet capsa_<id>`` and ``bridge capsa_<id>`` (one pair per capsa
instance on a machine), and nothing else: both are rendered from the database and replaced in one
nftables transaction, so a rule is never half applied and no other table is touched. With no
local port left they are deleted. The script runs through libnftables, the library behind the
``nft`` command, called in this process: the same parser and the same single transaction as
``nft -f``, without starting a process (0.3 ms instead of 16 ms for a small table, on this
machine, and no CPU taken from the runtime while it starts a pod). The bridge table only stops
spoofing: a bound port's frames must carry its MAC and address.

Bridged traffic between pods of one network goes through the IP hooks too
(``net.bridge.bridge-nf-call-iptables``), where the bridge is the interface a packet enters or
leaves by; routed traffic between networks enters by one bridge and leaves by another.

- Every connection is checked once (conntrack: established and related packets pass).
- Egress: a packet that enters from a local port's bridge with the port's address as source goes
  through that port's egress rules; one from a source of the network's subnet that is no local
  port comes from another host over the overlay, whose own firewall checked it; anything else
  on a capsa bridge (a spoofed or unknown source) is dropped.
- Ingress: a packet for a local port goes through its ingress rules: a remote-group rule admits
  the group's members *on the same network* (so networks never reach each other, even though the
  host routes and even within one group), a CIDR rule admits its prefix from any network, and
  connections that a hostPort mapping made (``ct status dnat``) are admitted. A packet for an
  address of the subnet that is no local port is for another host over the overlay.
- Pods cannot reach other networks' gateway addresses on the host.
- A port or network whose ``admin_state_up`` is false passes nothing.
- hostPort mappings: a connection to any local address (loopback excepted) on the host port is
  DNATed to the pod.

IPv6 to and from pods is dropped: ports have IPv4 addresses only, so no rule could admit it (a
rule of ethertype IPv6 has nothing to match), and link-local IPv6 would otherwise let pods of one
network talk whatever their groups say.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import ipaddress
import threading
from collections.abc import Iterable

from capsa.log import get_logger
from capsa.model.network import (
    ICMP_PROTOCOLS,
    PORT_PROTOCOLS,
    PROTOCOL_NUMBERS,
    Direction,
    EtherType,
    HostNetworkView,
    LocalPort,
    SecurityGroupRule,
)

log = get_logger(__name__)

# Debian's libnftables1, which its nftables package (the nft command) depends on.
LIBNFTABLES = "libnftables.so.1"


def table_name(instance: str) -> str:
    """capsa's table for one instance (e.g. its state dir): distinct per instance."""
    return "capsa_" + hashlib.sha256(instance.encode()).hexdigest()[:10]


class FirewallError(Exception):
    pass


# A table's content: each set and chain ("set NAME", "chain NAME") with its declaration, sets
# first, in the order a script declares them.
Objects = dict[str, str]


def render(view: HostNetworkView, bridge_of: dict[str, str]) -> dict[str, Objects]:
    """What capsa's table of each family ("inet", "bridge") must hold to enforce ``view`` (its
    host ports included); nothing when the table must go. ``bridge_of`` maps a network id to
    its bridge."""
    return {
        "inet": _inet_table(view, bridge_of),
        "bridge": _anti_spoofing(view),
    }


def script(family: str, table: str, objects: Objects, applied: Objects | None) -> str:
    """The commands that make ``table`` of ``family`` hold exactly ``objects`` ("" if nothing is
    to be done); several families' run as one transaction.

    ``applied`` is what the table holds (as an earlier script of this process left it): only the
    sets and chains that changed are then flushed and declared again, the new ones declared and
    the gone ones deleted, so a change of one port touches that port's chains and the few shared
    ones, not every port's. None (unknown, e.g. at start or after a failure): the table is
    replaced whole.
    """
    if applied is not None and objects == applied:
        return ""
    # Declaring the table first makes the delete succeed whether it existed or not.
    replace = f"table {family} {table} {{}}\ndelete table {family} {table}\n"
    if not objects:
        return replace
    if not applied:
        return replace + _declaring(family, table, objects.values())
    changed = [key for key, text in objects.items() if key in applied and applied[key] != text]
    gone = [key for key in reversed(applied) if key not in objects]
    return (
        "".join(f"flush {key.replace(' ', f' {family} {table} ', 1)}\n" for key in changed)
        + _declaring(
            family, table, (text for key, text in objects.items() if applied.get(key) != text)
        )
        # Last, and the referring before the referred: nothing names them any more by then.
        + "".join(f"delete {key.replace(' ', f' {family} {table} ', 1)}\n" for key in gone)
    )


def _declaring(family: str, table: str, declarations: Iterable[str]) -> str:
    return f"table {family} {table} {{\n" + "".join(declarations) + "}\n"


def _object(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def _inet_table(view: HostNetworkView, bridge_of: dict[str, str]) -> Objects:
    """The table that isolates networks and enforces the ports' groups; none without a port."""
    if not view.ports:
        return {}
    objects: Objects = {}
    bridges = sorted({bridge_of[p.network.id] for p in view.ports})
    subnet_of_bridge = sorted({(bridge_of[p.network.id], str(p.subnet.cidr)) for p in view.ports})
    gateways = sorted({(bridge_of[p.network.id], str(p.subnet.gateway_ip)) for p in view.ports})
    sets = _member_sets(view)
    for name, addresses in sorted(sets.items()):
        elements = f" elements = {{ {', '.join(addresses)} }};" if addresses else ""
        objects[f"set {name}"] = _object(f"  set {name} {{ type ipv4_addr;{elements} }}")
    bridge_set = _set_literal(f'"{b}"' for b in bridges)

    objects["chain forward"] = _object(
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *_admin_down(view, bridge_of),
        "    ct state established,related accept",
        f"    iifname {bridge_set} jump pod_egress",
        f"    oifname {bridge_set} jump pod_ingress",
        "  }",
    )
    objects["chain input"] = _object(
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        *(
            f'    iifname "{bridge}" ip daddr {_set_literal(others)} drop'
            for bridge in bridges
            if (others := [gw for b, gw in gateways if b != bridge])
        ),
        "  }",
    )

    egress_map = [
        f'"{bridge_of[p.network.id]}" . {p.port.ip_address} : jump {_chain(p, "e")}'
        for p in view.ports
    ]
    ingress_map = [
        f'"{bridge_of[p.network.id]}" . {p.port.ip_address} : jump {_chain(p, "i")}'
        for p in view.ports
    ]
    objects["chain pod_egress"] = _object(
        "  chain pod_egress {",
        "    meta nfproto ipv6 drop",
        f"    iifname . ip saddr vmap {{ {', '.join(egress_map)} }}",
        *(f'    iifname "{b}" ip saddr {cidr} return' for b, cidr in subnet_of_bridge),
        "    drop",
        "  }",
    )
    objects["chain pod_ingress"] = _object(
        "  chain pod_ingress {",
        "    meta nfproto ipv6 drop",
        f"    oifname . ip daddr vmap {{ {', '.join(ingress_map)} }}",
        *(f'    oifname "{b}" ip daddr {cidr} return' for b, cidr in subnet_of_bridge),
        "    drop",
        "  }",
    )
    for local in view.ports:
        rules = [r for g in local.port.security_group_ids for r in view.rules.get(g, ())]
        for direction, suffix, verdict in (
            (Direction.EGRESS, "e", "return"),
            (Direction.INGRESS, "i", "accept"),
        ):
            lines = [f"  chain {_chain(local, suffix)} {{"]
            if direction is Direction.INGRESS:
                lines.append("    ct status dnat accept")
            for rule in rules:
                if rule.direction is direction:
                    match = _match(rule, local)
                    if match is not None:
                        lines.append(f"    {match} {verdict}" if match else f"    {verdict}")
            lines += ["    drop", "  }"]
            objects[f"chain {_chain(local, suffix)}"] = _object(*lines)

    by_port = {p.port.id: p for p in view.ports}
    dnat = [
        f"    ip daddr != 127.0.0.0/8 meta l4proto {m.protocol} th dport {m.host_port} "
        f"dnat ip to {by_port[m.port_id].port.ip_address}:{m.container_port}"
        for m in sorted(view.host_ports, key=lambda m: (m.protocol, m.host_port))
        if m.port_id in by_port
    ]
    if dnat:
        objects["chain host_ports"] = _object("  chain host_ports {", *dnat, "  }")
        objects["chain prerouting"] = _object(
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            "    fib daddr type local jump host_ports",
            "  }",
        )
        objects["chain output"] = _object(
            "  chain output {",
            # nft 1.0 names dstnat only for prerouting; -100 is the same priority.
            "    type nat hook output priority -100; policy accept;",
            "    fib daddr type local jump host_ports",
            "  }",
        )
    return objects


def _anti_spoofing(view: HostNetworkView) -> Objects:
    """A bridge table that drops what a bound port sends from another MAC or address (ARP
    included), where the frame enters the bridge: a pod cannot pass for another."""
    bound = [p for p in view.ports if p.port.binding_host_ifname]
    if not bound:
        return {}
    jumps = ", ".join(f'"{p.port.binding_host_ifname}" : jump {_chain(p, "s")}' for p in bound)
    objects = {
        "chain prerouting": _object(
            "  chain prerouting {",
            "    type filter hook prerouting priority filter; policy accept;",
            f"    iifname vmap {{ {jumps} }}",
            "  }",
        )
    }
    for local in bound:
        port = local.port
        objects[f"chain {_chain(local, 's')}"] = _object(
            f"  chain {_chain(local, 's')} {{",
            f"    ether saddr != {port.mac_address} drop",
            f"    ip saddr != {port.ip_address} drop",
            f"    arp saddr ip != {port.ip_address} drop",
            "    ether type ip6 drop",
            "  }",
        )
    return objects


def _admin_down(view: HostNetworkView, bridge_of: dict[str, str]) -> list[str]:
    """Ports (or networks) set administratively down pass nothing, established traffic included."""
    down = [
        f'"{bridge_of[p.network.id]}" . {p.port.ip_address}'
        for p in view.ports
        if not (p.port.admin_state_up and p.network.admin_state_up)
    ]
    if not down:
        return []
    return [
        f"    iifname . ip saddr {_set_literal(down)} drop",
        f"    oifname . ip daddr {_set_literal(down)} drop",
    ]


def _chain(local: LocalPort, suffix: str) -> str:
    return f"port_{local.port.id.replace('-', '')[:12]}_{suffix}"


def _set_name(group_id: str, network_id: str) -> str:
    return f"members_{group_id.replace('-', '')[:12]}_{network_id.replace('-', '')[:12]}"


def _member_sets(view: HostNetworkView) -> dict[str, list[str]]:
    """One set per (remote group, network of a local port that a rule uses it on), each filled
    once however many local ports use it (a host's ports are mostly in one group)."""
    wanted = {
        (rule.remote_group_id, local.network.id)
        for local in view.ports
        for group_id in local.port.security_group_ids
        for rule in view.rules.get(group_id, ())
        if rule.remote_group_id is not None
    }
    return {
        _set_name(group_id, network): [
            str(ip)
            for member_network, ip in view.members.get(group_id, ())
            if member_network == network
        ]
        for group_id, network in wanted
    }


def _match(rule: SecurityGroupRule, local: LocalPort) -> str | None:
    """The nft match of ``rule`` for ``local``'s chain, or None when it can match nothing."""
    if rule.ethertype is not EtherType.IPV4:
        return None
    peer = "saddr" if rule.direction is Direction.INGRESS else "daddr"
    parts: list[str] = []
    if rule.remote_ip_prefix is not None:
        if not isinstance(rule.remote_ip_prefix, ipaddress.IPv4Network):
            return None
        parts.append(f"ip {peer} {rule.remote_ip_prefix}")
    elif rule.remote_group_id is not None:
        parts.append(f"ip {peer} @{_set_name(rule.remote_group_id, local.network.id)}")
    if rule.protocol is not None:
        number = PROTOCOL_NUMBERS.get(rule.protocol, None)
        protocol = number if number is not None else int(rule.protocol)
        parts.append(f"meta l4proto {protocol}")
        low, high = rule.port_range_min, rule.port_range_max
        if rule.protocol in PORT_PROTOCOLS and low is not None:
            parts.append(f"th dport {low}" if high in (None, low) else f"th dport {low}-{high}")
        elif rule.protocol in ICMP_PROTOCOLS and protocol == 1 and low is not None:
            parts.append(f"icmp type {low}")
            if high is not None:
                parts.append(f"icmp code {high}")
    return " ".join(parts)


def _set_literal(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


async def apply(script: str) -> None:
    """Runs ``script`` as one nftables transaction; raises FirewallError with nft's words."""
    await asyncio.to_thread(_nftables().run, script)


def release() -> bool:
    """Frees the libnftables context, if one is made: its parser and cache keep about 4 MB
    resident, and a host without ports has no use for them. The next :func:`apply` makes a new
    one (about 16 ms on this project's machines). True if one was freed."""
    with _loading:
        return _loaded is not None and _loaded.close()


class _Nftables:
    """A libnftables context, made at the first script (and again after :meth:`close`); one
    script at a time (a context is not for several threads)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        library.nft_ctx_new.argtypes = [ctypes.c_uint32]
        library.nft_ctx_new.restype = ctypes.c_void_p
        library.nft_ctx_free.argtypes = [ctypes.c_void_p]
        library.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        library.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        library.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        library.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        library.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        library.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._library = library
        self._context: int | None = None
        self._lock = threading.Lock()

    def run(self, script: str) -> None:
        with self._lock:
            if self._context is None:
                self._context = self._library.nft_ctx_new(0)
                # Output and errors go to buffers rather than to this process's stdout and stderr.
                self._library.nft_ctx_buffer_output(self._context)
                self._library.nft_ctx_buffer_error(self._context)
            if self._library.nft_run_cmd_from_buffer(self._context, script.encode()) != 0:
                error = self._library.nft_ctx_get_error_buffer(self._context) or b""
                raise FirewallError(
                    f"nftables refused capsa's ruleset: {error.decode(errors='replace').strip()}"
                )

    def close(self) -> bool:
        with self._lock:
            if self._context is None:
                return False
            self._library.nft_ctx_free(self._context)
            self._context = None
            return True


_loaded: _Nftables | None = None
_loading = threading.Lock()


def _nftables() -> _Nftables:
    global _loaded
    with _loading:
        if _loaded is None:
            try:
                _loaded = _Nftables(ctypes.CDLL(LIBNFTABLES))
            except OSError as exc:
                raise FirewallError(
                    f"cannot load {LIBNFTABLES} (Debian: apt-get install nftables): capsa cannot "
                    f"isolate networks or enforce security groups ({exc})"
                ) from exc
        return _loaded

"""capsa's rulesets go to the kernel through libnftables, in capsa's process."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import replace

import pytest
from tests.unit.network.test_firewall import BRIDGES, GROUP_A, rule, view

from capsa.model.network import Direction, HostPortMapping
from capsa.network import firewall
from capsa.network.firewall import FirewallError, apply

pytestmark = pytest.mark.integration


def nft(*args: str) -> str:
    return subprocess.run(["nft", *args], capture_output=True, text=True).stdout


def tables_listing() -> str:
    return nft("list", "tables")


async def test_a_script_is_one_transaction_and_a_refused_one_changes_nothing() -> None:
    table = f"capsa_test_{secrets.token_hex(4)}"
    try:
        await apply(f"table inet {table}\ndelete table inet {table}\ntable inet {table} {{}}\n")
        assert f"table inet {table}" in tables_listing()

        # The second command is wrong: the first must not happen either.
        with pytest.raises(FirewallError, match=r"nftables refused capsa's ruleset: .*Error"):
            await apply(f"delete table inet {table}\nadd rule inet {table} nochain accept\n")
        assert f"table inet {table}" in tables_listing()
    finally:
        nft("delete", "table", "inet", table)
    assert f"table inet {table}" not in tables_listing()


async def test_after_the_context_is_released_the_next_script_gets_a_new_one() -> None:
    table = f"capsa_test_{secrets.token_hex(4)}"
    try:
        await apply(f"table inet {table} {{}}\n")
        assert firewall.release()
        assert not firewall.release(), "a released context was freed twice"

        await apply(f"add chain inet {table} after_release\n")
        assert "chain after_release" in nft("list", "table", "inet", table)
    finally:
        nft("delete", "table", "inet", table)


def table_objects(family: str, table: str) -> dict[str, str]:
    """The sets and chains of a table as nft lists them, by name (their order is the kernel's
    order of creation, which changes-only scripts do not keep)."""
    objects: dict[str, str] = {}
    for block in nft("list", "table", family, table).split("\n\n"):
        # Their lines are indented; the table's own ("table ... {", "}") are not.
        lines = [line for line in block.splitlines() if line.startswith("\t")]
        objects[lines[0].strip()] = "\n".join(lines)
    return objects


async def test_changes_only_scripts_leave_what_a_whole_replacement_makes() -> None:
    table = f"capsa_test_{secrets.token_hex(4)}"
    a, b = view().ports
    bound_a = replace(a, port=replace(a.port, binding_host_ifname="capsa0123456789"))
    down_b = replace(b, port=replace(b.port, admin_state_up=False))
    more_rules = {
        **view().rules,
        GROUP_A: (*view().rules[GROUP_A], rule(GROUP_A, Direction.INGRESS, protocol="udp")),
    }
    states = [
        view(),
        # A port bound, a host port, a member gone, a rule more.
        replace(
            view(),
            ports=(bound_a, b),
            host_ports=(HostPortMapping(a.port.id, 8080, 80, "tcp"),),
            members={GROUP_A: view().members[GROUP_A][:1]},
            rules=more_rules,
        ),
        # A port gone (its chains and its set), the host port gone (three chains), one down.
        replace(view(), ports=(down_b,), members={}),
        replace(view(), ports=(bound_a, b)),
        replace(view(), ports=()),
    ]
    applied: dict[str, firewall.Objects] | None = None
    try:
        for state in states:
            tables = firewall.render(state, BRIDGES)
            await apply(
                "".join(
                    firewall.script(f, table, objects, applied and applied[f])
                    for f, objects in tables.items()
                )
            )
            changed = {f: tables[f] and table_objects(f, table) for f in tables}
            await apply(
                "".join(firewall.script(f, table, objects, None) for f, objects in tables.items())
            )
            assert changed == {f: tables[f] and table_objects(f, table) for f in tables}
            applied = tables
        assert table not in tables_listing()
    finally:
        nft("delete", "table", "inet", table)
        nft("delete", "table", "bridge", table)

"""capsa's rulesets go to the kernel through libnftables, in capsa's process."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from capsa.network.firewall import FirewallError, apply

pytestmark = pytest.mark.integration


def nft(*args: str) -> str:
    return subprocess.run(["nft", *args], capture_output=True, text=True).stdout


def tables() -> str:
    return nft("list", "tables")


async def test_a_script_is_one_transaction_and_a_refused_one_changes_nothing() -> None:
    table = f"capsa_test_{secrets.token_hex(4)}"
    try:
        await apply(f"table inet {table}\ndelete table inet {table}\ntable inet {table} {{}}\n")
        assert f"table inet {table}" in tables()

        # The second command is wrong: the first must not happen either.
        with pytest.raises(FirewallError, match=r"nftables refused capsa's ruleset: .*Error"):
            await apply(f"delete table inet {table}\nadd rule inet {table} nochain accept\n")
        assert f"table inet {table}" in tables()
    finally:
        nft("delete", "table", "inet", table)
    assert f"table inet {table}" not in tables()

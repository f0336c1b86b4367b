"""The network agent of one host: makes the host's firewall (and its overlay) what the database
says, level-triggered like the compute agent.

A wake-up (a port, group or rule changed: :data:`capsa.store.notify.NETWORK`) or the periodic
resync reads the host's view in one transaction, renders capsa's nftables tables and replaces them
in one nftables transaction when they changed, and programs the VXLAN overlay of each network
that has a port here. None of it runs on the CNI daemon's ADD/DEL path: the port of a capsule is
allocated (and enforced here) before its sandbox exists, so its rules are in place by the time it
is plugged. Wake-ups that arrive while a pass runs are coalesced into one more pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from capsa.log import get_logger
from capsa.model.network import HostNetworkView
from capsa.network import firewall
from capsa.network.dataplane import Dataplane, DataplaneError
from capsa.network.service import bridge_name
from capsa.store import Store, notify

log = get_logger(__name__)


# Makes bridged IPv4 traffic go through the IP hooks, where capsa's table filters it (per netns).
BRIDGE_NF_CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def _filter_bridged_traffic() -> None:
    """Without it, pods of one network would reach each other whatever their groups say."""
    try:
        if BRIDGE_NF_CALL_IPTABLES.read_text().strip() != "1":
            BRIDGE_NF_CALL_IPTABLES.write_text("1\n")
            log.info(
                "bridged traffic now goes through the firewall", sysctl=str(BRIDGE_NF_CALL_IPTABLES)
            )
    except OSError as exc:
        log.warning(
            "cannot make bridged traffic go through the firewall: security groups do not apply "
            "between pods of one network on this host",
            sysctl=str(BRIDGE_NF_CALL_IPTABLES),
            error=str(exc),
        )


@dataclass(frozen=True)
class OverlaySettings:
    """This host's end of the networks' VXLAN segments."""

    local_ip: str
    port: int = 4789


class NetworkAgent:
    def __init__(
        self,
        store: Store,
        host: str,
        table: str,
        dataplane: Dataplane,
        resync_interval: float,
        overlay: OverlaySettings | None = None,
    ) -> None:
        self._store = store
        self._host = host
        self._table = table
        self._dataplane = dataplane
        self._resync_interval = resync_interval
        self._overlay = overlay
        self._applied: str | None = None
        self._overlay_networks: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        _filter_bridged_traffic()
        wakeups = self._store.hub.subscribe(notify.NETWORK)
        await self._store.hosts.set_tunnel_ip(
            self._host, self._overlay.local_ip if self._overlay else None
        )
        await self.sync()
        self._task = asyncio.create_task(self._loop(wakeups), name="network-agent")

    async def stop(self) -> None:
        """Stops the loop; the table stays while ports remain (their pods keep running), and goes
        when none is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.sync()

    async def _loop(self, wakeups: notify.Subscription) -> None:
        try:
            while True:
                await wakeups.wait(self._resync_interval)
                try:
                    await self.sync()
                except Exception:
                    log.exception(
                        "network agent pass failed; the next one retries", host=self._host
                    )
        finally:
            wakeups.close()

    async def sync(self) -> None:
        """One pass: the firewall, then the overlay."""
        view = await self._store.ports.host_view(self._host)
        bridges = {p.network.id: bridge_name(p.network.id) for p in view.ports}
        script = firewall.render(self._table, view, bridges)
        if script != self._applied:
            await firewall.apply(script)
            self._applied = script
            log.info(
                "firewall updated" if view.ports else "firewall removed: no port left",
                host=self._host,
                table=self._table,
                ports=len(view.ports),
                host_ports=len(view.host_ports),
            )
        if self._overlay is not None:
            await asyncio.to_thread(self._sync_overlay, view, self._overlay)

    def _sync_overlay(self, view: HostNetworkView, overlay: OverlaySettings) -> None:
        networks = {p.network.id: p.network for p in view.ports}
        for network_id, network in networks.items():
            remote = [r for r in view.remote_ports if r.network_id == network_id]
            try:
                self._dataplane.sync_overlay(
                    bridge_name(network_id),
                    vni=network.segmentation_id,
                    local_ip=overlay.local_ip,
                    port=overlay.port,
                    mtu=network.mtu,
                    macs={r.mac_address: r.tunnel_ip for r in remote},
                )
            except DataplaneError as exc:
                log.warning("cannot program the overlay", network=network_id, error=str(exc))
        for network_id in self._overlay_networks - set(networks):
            self._dataplane.remove_overlay(bridge_name(network_id))
        self._overlay_networks = set(networks)

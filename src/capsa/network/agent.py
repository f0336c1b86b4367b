"""The network agent of one host: makes the host's firewall (and its overlay) what the database
says, level-triggered like the compute agent.

A wake-up (a port, group or rule changed: :data:`capsa.store.notify.NETWORK`) or the periodic
resync reads the host's view in one transaction, renders capsa's nftables tables and brings them to
it in one nftables transaction, and programs the VXLAN overlay of each network that has a port
here. Wake-ups come for changes anywhere (other hosts' ports, groups this host does not use), and a
capsule's start or end changes little: when the rows the view is made from are what the last
applied pass read, the pass renders nothing; otherwise only the sets and chains that changed are
sent (a new port's chains and the few shared ones, not every port's; a sandbox's ADD or DEL changes
the bridge table alone). The first pass, and one whose changes nftables refused (the tables are
not what this process left), replace the tables whole. None of it runs on the CNI daemon's ADD/DEL
path, but an ADD waits until a pass enforces its ports (:class:`FirewallProgress`, which each
applied pass updates): the compute agent asks for a sandbox while its ports are being allocated.
Wake-ups that arrive while a pass runs are coalesced into one more pass, and the next pass waits,
from the end of the last one, for as long again as that one took, times :data:`PASS_SPACING`:
while changes stream in (a burst's allocations, bindings and releases), the agent takes at most a
third of the time and its passes take in several changes each; the first wake-up after a quiet
spell, such as a lone capsule's, is served at once, and a host with few ports, whose passes are
short, hardly waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from time import monotonic

from capsa.log import get_logger
from capsa.model.network import HostNetworkView
from capsa.network import firewall
from capsa.network.dataplane import Dataplane, DataplaneError
from capsa.network.enforcement import FirewallProgress
from capsa.network.service import bridge_name, capsule_port_bindings
from capsa.store import Store, notify
from capsa.store.ports import HostViewRows

log = get_logger(__name__)

# How long the next pass waits after the last one ended, as a multiple of how long that one took
# (see the module's doc). In bursts of twenty capsules (40 ports at most), it took capsa's CPU
# per burst from about 1.1 s to 0.8 s; a lone capsule's two passes (3-6 ms each) come some 20 ms
# apart and never wait.
PASS_SPACING = 2.0

# A host with more ports than this has its view read on a database thread rather than on the
# event loop (about 1 ms of reading at this size, less than the hand-off to a thread costs).
_VIEW_READ_ON_LOOP_UP_TO = 20


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
        progress: FirewallProgress | None = None,
    ) -> None:
        self._store = store
        self._host = host
        self._table = table
        self._dataplane = dataplane
        self._resync_interval = resync_interval
        self._overlay = overlay
        self._progress = progress
        # Per family, what the table holds (None: unknown, it is replaced whole); the rows of the
        # view it came from, and the view.
        self._applied: dict[str, firewall.Objects] | None = None
        self._rows: HostViewRows | None = None
        self._view: HostNetworkView | None = None
        self._overlay_networks: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        # When a pass last saw a port here (None: none since start).
        self._ports_seen_at: float | None = None

    async def start(self) -> None:
        _filter_bridged_traffic()
        wakeups = self._store.hub.subscribe(notify.NETWORK)
        if self._progress is not None:
            self._progress.serve(functools.partial(self._store.hub.publish, notify.NETWORK))
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
        ended, took = monotonic(), 0.0
        try:
            while True:
                await wakeups.wait(self._resync_interval)
                early = ended + took * PASS_SPACING - monotonic()
                if early > 0:
                    await asyncio.sleep(early)
                    # This pass reads what the wake-ups that came meanwhile announced.
                    wakeups.discard_pending()
                began = monotonic()
                try:
                    await self.sync()
                except Exception:
                    log.exception(
                        "network agent pass failed; the next one retries", host=self._host
                    )
                ended = monotonic()
                took = ended - began
        finally:
            wakeups.close()

    async def sync(self) -> None:
        """One pass: the firewall, then the overlay."""
        rows, view = await self._store.ports.host_view_if_changed(
            self._host,
            self._rows,
            long=self._view is not None and len(self._view.ports) > _VIEW_READ_ON_LOOP_UP_TO,
        )
        if view is not None:
            await self._enforce(view)
            self._rows, self._view = rows, view
            if self._progress is not None:
                self._progress.applied(
                    (p.port.id for p in view.ports), capsule_port_bindings(view.ports)
                )
        if self._overlay is not None and self._view is not None:
            await asyncio.to_thread(self._sync_overlay, self._view, self._overlay)
        await self._release_unused_firewall()

    async def _release_unused_firewall(self) -> None:
        """Frees nftables' context once the host has had no port for a resync interval (at
        once when it never had one since start): an idle capsa does not keep it, and capsules
        that come and go do not pay to make it again at each start."""
        now = monotonic()
        if self._view is None or self._view.ports:
            self._ports_seen_at = now
            return
        if self._ports_seen_at is not None and now - self._ports_seen_at < self._resync_interval:
            return
        if await asyncio.to_thread(firewall.release):
            log.info("firewall engine released: no port on this host", host=self._host)

    async def _enforce(self, view: HostNetworkView) -> None:
        """Brings the tables to ``view``, all in one nftables transaction."""
        bridges = {p.network.id: bridge_name(p.network.id) for p in view.ports}
        tables = firewall.render(view, bridges)
        applied = self._applied
        changes = self._script(tables, applied)
        if not changes:
            return
        # Unknown from here until a script succeeds: the next one replaces the tables whole.
        self._applied = None
        try:
            await firewall.apply(changes)
        except firewall.FirewallError as exc:
            if applied is None:
                raise
            # The tables are not what this process left (someone changed them): whole again.
            log.warning(
                "firewall changes refused; replacing the tables whole",
                host=self._host,
                table=self._table,
                error=str(exc),
            )
            await firewall.apply(self._script(tables, None))
        self._applied = tables
        log.info(
            "firewall updated" if view.ports else "firewall removed: no port left",
            host=self._host,
            table=self._table,
            ports=len(view.ports),
            host_ports=len(view.host_ports),
        )

    def _script(
        self, tables: dict[str, firewall.Objects], applied: dict[str, firewall.Objects] | None
    ) -> str:
        return "".join(
            firewall.script(
                family, self._table, objects, None if applied is None else applied[family]
            )
            for family, objects in tables.items()
        )

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

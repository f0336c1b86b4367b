"""The compute agent of one host: a level-triggered reconciler of its capsules on the CRI runtime.

Three things start work on a capsule, and each only *kicks* it; a kick runs one worker per capsule
(a second kick while it works makes it run once more), so two steps never race on one capsule:

- a wake-up from the store (a capsule was placed here, or is to be deleted): immediate, and about
  that capsule only;
- the container watcher: a container of ours exited or vanished (restart policy, init progress);
- the periodic resync, which compares the database with everything the runtime holds, kicks every
  capsule that is not as it should be, removes sandboxes that belong to no capsule of this host,
  and stops shims that capsa's own containerd lost (see capsa.runtime.shims).

At start the agent registers its host and resyncs, which is also how it recovers after a crash:
sandboxes and containers are found again by their labels, and adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from capsa.compute import labels
from capsa.compute.driver import CapsuleDriver, DriverSettings, Superseded, settled
from capsa.compute.host import schedulable_capacity
from capsa.compute.images import ImagePuller, RegistryCredentials
from capsa.config import Config
from capsa.cri import types as cri
from capsa.cri.client import CriClient, CriError
from capsa.log import get_logger
from capsa.model.capsule import Capsule, DesiredState, Status
from capsa.network.service import NetworkService
from capsa.runtime.shims import stop_lost_shims
from capsa.runtime.tasks import free_stranded_task
from capsa.secrets import SecretBox
from capsa.store import Store, notify

log = get_logger(__name__)


class ComputeAgent:
    def __init__(
        self, cfg: Config, store: Store, cri_client: CriClient, network: NetworkService
    ) -> None:
        self.host = cfg.resolved_host_name
        self._cfg = cfg
        self._store = store
        self._cri = cri_client
        self._driver = CapsuleDriver(
            DriverSettings(
                host=self.host,
                default_runtime=cfg.agent.runtimes[0],
                pod_log_dir=cfg.pod_log_dir,
                cgroup_parent=cfg.agent.cgroup_parent,
                stop_grace_period=cfg.agent.stop_grace_period,
                restart_backoff_base=cfg.agent.restart_backoff_base,
                restart_backoff_max=cfg.agent.restart_backoff_max,
                max_sandbox_calls=cfg.agent.max_parallel,
            ),
            store,
            cri_client,
            network,
            ImagePuller(
                cri_client,
                RegistryCredentials(store, SecretBox.load_or_create(cfg.credentials_key_path)),
            ),
            self.kick_later,
            self._free_stranded_task,
        )
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._converging: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    # ---- life cycle ----

    async def start(self) -> None:
        """Registers the host, recovers what the runtime holds, and starts the loops."""
        version = await self._cri.version()
        log.info(
            "container runtime ready",
            host=self.host,
            runtime=f"{version.runtime_name} {version.runtime_version}",
            cri=version.runtime_api_version,
        )
        agent = self._cfg.agent
        cpu_millis, memory_mb = schedulable_capacity(
            agent.cpu_allocation_ratio, agent.memory_allocation_ratio, agent.reserved_memory_mb
        )
        wakeups = self._store.hub.subscribe(notify.host_topic(self.host))
        await self._store.hosts.register(
            self.host, self._cfg.agent_url, cpu_millis, memory_mb, agent.runtimes
        )
        log.info(
            "host registered",
            host=self.host,
            cpu=cpu_millis / 1000,
            memory_mb=memory_mb,
            runtimes=",".join(agent.runtimes),
        )
        await self.resync()
        self._loops = [
            asyncio.create_task(self._follow_wakeups(wakeups), name="agent-wakeups"),
            asyncio.create_task(self._watch_containers(), name="agent-container-watch"),
            asyncio.create_task(self._heartbeat(), name="agent-heartbeat"),
        ]

    async def stop(self) -> None:
        """Stops the loops and the workers; whatever was half done is resumed at the next start."""
        for timer in self._timers.values():
            timer.cancel()
        tasks = [*self._loops, *self._workers.values(), *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        _remove_empty_cgroups(self._cfg.agent.cgroup_parent)

    async def idle(self) -> None:
        """Waits until no capsule is being worked on (for tests and benchmarks)."""
        while self._workers:
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _free_stranded_task(self, container_id: str) -> None:
        await free_stranded_task(self._cfg.cri_socket, container_id, self._cfg.agent.cri_timeout)

    # ---- kicks and workers ----

    def kick(self, capsule_uuid: str) -> None:
        """Has a worker look at the capsule now, or once more if one is at it."""
        if capsule_uuid in self._workers:
            self._again.add(capsule_uuid)
            return
        self._workers[capsule_uuid] = asyncio.create_task(
            self._work(capsule_uuid), name=f"capsule {capsule_uuid}"
        )

    def kick_later(self, capsule_uuid: str, delay: float) -> None:
        timer = self._timers.pop(capsule_uuid, None)
        if timer is not None:
            timer.cancel()
        self._timers[capsule_uuid] = asyncio.get_running_loop().call_later(
            delay, self._fire_timer, capsule_uuid
        )

    def _fire_timer(self, capsule_uuid: str) -> None:
        self._timers.pop(capsule_uuid, None)
        self.kick(capsule_uuid)

    async def _work(self, capsule_uuid: str) -> None:
        try:
            while True:
                self._again.discard(capsule_uuid)
                await self._work_once(capsule_uuid)
                if capsule_uuid not in self._again:
                    return
        except Exception:
            log.exception("capsule worker failed; the resync will retry", capsule=capsule_uuid)
        finally:
            del self._workers[capsule_uuid]

    async def _work_once(self, capsule_uuid: str) -> None:
        capsule = await self._store.capsules.get(capsule_uuid)
        if capsule is None or capsule.host != self.host:
            return
        if capsule.desired_state is DesiredState.DELETED:
            await self._driver.teardown(capsule)
            return
        converge = asyncio.create_task(self._driver.converge(capsule))
        self._converging[capsule_uuid] = converge
        try:
            await converge
        except Superseded:
            # Deleted while being started: go round once more, to tear it down.
            self._again.add(capsule_uuid)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            self._again.add(capsule_uuid)
        finally:
            self._converging.pop(capsule_uuid, None)

    def _preempt(self, capsule_uuid: str) -> None:
        """A capsule being started was deleted: stop starting it (a pull or an init wait)."""
        converge = self._converging.get(capsule_uuid)
        if converge is not None:
            converge.cancel()

    # ---- what starts work ----

    async def _follow_wakeups(self, wakeups: notify.Subscription) -> None:
        try:
            while True:
                woken = await wakeups.wait(self._cfg.agent.resync_interval)
                capsule_uuids = wakeups.take_subjects()
                try:
                    if not woken:
                        await self.resync()
                    elif capsule_uuids is None:
                        await self._kick_pending()
                    else:
                        for capsule_uuid in capsule_uuids:
                            await self._kick_changed(capsule_uuid)
                except Exception:
                    log.exception("agent pass failed; retrying at the next one", host=self.host)
        finally:
            wakeups.close()

    async def _kick_pending(self) -> None:
        """After a wake-up: kicks capsules that are being created or deleted (database only)."""
        for capsule in await self._store.capsules.list_for_host(self.host):
            if capsule.desired_state is DesiredState.DELETED:
                self._preempt(capsule.uuid)
                self.kick(capsule.uuid)
            elif capsule.status is Status.CREATING and capsule.uuid not in self._workers:
                self.kick(capsule.uuid)

    async def _kick_changed(self, capsule_uuid: str) -> None:
        """After a wake-up about one capsule (placed here, or to be deleted)."""
        if capsule_uuid in self._converging:
            # Being started: only a delete can be the news, which must stop the start.
            capsule = await self._store.capsules.get(capsule_uuid)
            if capsule is None or capsule.desired_state is DesiredState.DELETED:
                self._preempt(capsule_uuid)
        self.kick(capsule_uuid)

    async def resync(self) -> None:
        """Compares the database with the runtime; kicks what differs, removes orphan sandboxes."""
        # The runtime is listed before the database: a sandbox seen here whose capsule is not
        # in the database afterwards truly belongs to no capsule (records go after sandboxes).
        every_sandbox = await self._cri.list_pod_sandboxes()
        sandboxes = [s for s in every_sandbox if s.labels.get(labels.MANAGED) == "true"]
        containers = await self._cri.list_containers(labels=labels.MANAGED_SELECTOR)
        if self._cfg.manages_containerd:
            # Older than any sandbox start could take, so a shim being started is left alone.
            await asyncio.to_thread(
                stop_lost_shims,
                self._cfg.cri_socket,
                {s.id for s in every_sandbox},
                2 * self._cfg.agent.cri_timeout,
            )
        capsules = {c.uuid: c for c in await self._store.capsules.list_for_host(self.host)}
        for sandbox in sandboxes:
            owner = sandbox.labels.get(labels.CAPSULE, "")
            if owner not in capsules and owner not in self._workers:
                self._in_background(self._driver.remove_orphan(sandbox))
        for capsule in capsules.values():
            if _needs_work(capsule, sandboxes, containers):
                self.kick(capsule.uuid)

    async def _watch_containers(self) -> None:
        """Kicks a capsule when one of its containers exits or vanishes."""
        known: dict[str, tuple[str, cri.ContainerState]] = {}
        while True:
            await asyncio.sleep(self._cfg.agent.container_poll_interval)
            try:
                containers = await self._cri.list_containers(labels=labels.MANAGED_SELECTOR)
            except CriError as exc:
                log.warning("cannot list containers", host=self.host, reason=exc.message)
                continue
            seen: dict[str, tuple[str, cri.ContainerState]] = {}
            for c in containers:
                capsule_uuid = c.labels.get(labels.CAPSULE, "")
                seen[c.id] = (capsule_uuid, c.state)
                before = known.get(c.id)
                if c.state is cri.ContainerState.EXITED and (
                    before is None or before[1] != c.state
                ):
                    self.kick(capsule_uuid)
            for container_id, (capsule_uuid, _) in known.items():
                if container_id not in seen:
                    self.kick(capsule_uuid)
            known = seen

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.agent.heartbeat_interval)
            try:
                await self._store.hosts.heartbeat(self.host)
            except Exception:
                log.exception("heartbeat failed", host=self.host)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _needs_work(
    capsule: Capsule, sandboxes: list[cri.PodSandbox], containers: list[cri.Container]
) -> bool:
    if capsule.desired_state is DesiredState.DELETED or capsule.status is Status.CREATING:
        return True
    if settled(capsule):
        return False
    if capsule.task_state is not None or capsule.pending_signal is not None:
        # An action the tenant asked for (its wake-up may have been lost), or a step under way.
        return True
    if capsule.desired_state is DesiredState.STOPPED:
        return False
    ready = [
        s
        for s in sandboxes
        if s.labels.get(labels.CAPSULE) == capsule.uuid and s.state is cri.SandboxState.READY
    ]
    if len(ready) != 1:
        return True
    states: dict[str, cri.Container] = {}
    for c in containers:
        if c.sandbox_id == ready[0].id:
            uuid = c.labels.get(labels.CONTAINER, "")
            if uuid not in states or c.attempt > states[uuid].attempt:
                states[uuid] = c
    return any(
        c.uuid not in states
        or states[c.uuid].state is not cri.ContainerState.RUNNING
        or labels.generation(states[c.uuid].labels) != capsule.generation
        for c in capsule.containers
        if c.status is not Status.STOPPED
    )


def _remove_empty_cgroups(parent: str) -> None:
    """Removes the cgroup parent directories that runc created and left, where they are empty."""
    if not parent.strip("/"):
        return
    for controller in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            (controller / parent.strip("/")).rmdir()

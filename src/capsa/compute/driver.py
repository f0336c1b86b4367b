"""One capsule on the CRI runtime: converge it to what was asked, or tear it down.

Every step starts from what the runtime reports (sandboxes and containers found by their labels), so
that running a step twice, or after a crash at any point, neither loses nor duplicates anything:

- a ready sandbox of the capsule is adopted; other sandboxes of it are removed;
- init containers run one by one to completion, in order; a finished one is never run again;
- containers are created and started once; an exited one is restarted as the restart policy says,
  with an exponential back-off; a created one is started only if its creation was recorded (one
  that a call cut short made may be made wrong: it is made again);
- a container that cannot be created or started in a sandbox that is no longer ready is no fault
  of the tenant: the next pass replaces the sandbox;
- a container whose start the agent's own crash cut short never ran: it is made and started
  again, and that counts as no restart; the task containerd may keep behind it, which blocks
  its removal and its sandbox's, is freed and the removal retried;
- status, status_reason and task_state follow in the database, written only when they change, and
  only while the tenant still wants the capsule (compare-and-swap on the desired state); a write
  that announces a runtime call (container_creating, container_starting) runs alongside it, not
  before it, and a refused one ends the pass once the call has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from capsa.compute import labels
from capsa.compute.errors import CapsuleFailed, RetryLater, classify, name_taken, stranded_task
from capsa.compute.images import ImagePuller
from capsa.cri import types as cri
from capsa.cri.client import CriClient, CriError, CriNotFound
from capsa.log import get_logger
from capsa.model.capsule import (
    Capsule,
    CapsuleKind,
    Container,
    DesiredState,
    RestartPolicy,
    Status,
    TaskState,
)
from capsa.model.clock import utcnow
from capsa.model.network import Attachment
from capsa.network.service import NetworkService
from capsa.runtime.tasks import StrandedTaskError
from capsa.store import Store
from capsa.store.networks import Ambiguous, NoFreeCidr, NotFound, RepeatedNetwork
from capsa.store.ports import SubnetFull

log = get_logger(__name__)

T = TypeVar("T")

_MIB = 1024 * 1024
_CPU_PERIOD_US = 100_000
# How long a pass waits for an init container to finish before leaving it to the watcher.
_INIT_WAIT_S = 3.0
_POLL_S = 0.1
# Delay before retrying a step that failed for a reason that may pass.
_RETRY_S = 2.0
# What a failed RunPodSandbox says the agent was doing, in the capsule's status_reason.
_STARTING_SANDBOX = "starting the capsule's sandbox"
# What containerd 1.6 says of a StartContainer whose caller cancelled it (see _start_cut_short).
_CUT_SHORT = re.compile(r"context canceled|failed to start shim: .*signal: killed")


@dataclass
class _Unwritten:
    """A capsule's fields, and its containers' by uuid, recorded but not written yet."""

    capsule: dict[str, Any] = field(default_factory=dict)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)


class Superseded(Exception):
    """The tenant deleted the capsule while it was being converged; stop and let teardown run."""


@dataclass(frozen=True)
class DriverSettings:
    host: str
    default_runtime: str
    pod_log_dir: Path
    cgroup_parent: str
    stop_grace_period: int
    restart_backoff_base: float
    restart_backoff_max: float
    max_sandbox_calls: int


class CapsuleDriver:
    def __init__(
        self,
        settings: DriverSettings,
        store: Store,
        cri_client: CriClient,
        network: NetworkService,
        images: ImagePuller,
        retry_at: Callable[[str, float], None],
        free_stranded_task: Callable[[str], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._store = store
        self._cri = cri_client
        self._network = network
        self._images = images
        # Asks the agent to look at a capsule again after a delay (back-off, retries).
        self._retry_at = retry_at
        # Frees a task that containerd keeps behind a container CRI calls exited (see
        # capsa.runtime.tasks); raises StrandedTaskError when it cannot.
        self._free_stranded_task = free_stranded_task
        # Bounds the runtime's heaviest calls (a shim, a netns and a CNI run each), not whole
        # capsules: a capsule waiting for an init container must not hold up a burst of others.
        self._sandbox_slots = asyncio.Semaphore(settings.max_sandbox_calls)
        # Fields a pass recorded and has not written yet, by capsule: they go with the capsule's
        # next write (one transaction; at the latest the one alongside the runtime's next change)
        # and at the end of the pass.
        self._unwritten: dict[str, _Unwritten] = {}

    # ---- converge ----

    async def converge(self, capsule: Capsule) -> None:
        """Brings the runtime to what ``capsule`` asks; safe to repeat at any point."""
        if settled(capsule):
            return
        try:
            try:
                await self._converge(capsule)
                await self._write_recorded(capsule)
            except CriError as exc:
                raise classify(exc, "talking to the container runtime") from exc
        except CapsuleFailed as exc:
            reason = str(exc)
            log.warning("capsule failed", capsule=capsule.uuid, reason=reason)
            await self._set_capsule(
                capsule, status=Status.ERROR, status_reason=reason, task_state=None
            )
        except RetryLater as exc:
            log.warning("capsule step will be retried", capsule=capsule.uuid, reason=str(exc))
            await self._set_capsule(capsule, status_reason=f"retrying: {exc}")
            self._retry_at(capsule.uuid, _RETRY_S)
        finally:
            # A pass cut short (deleted meanwhile, or the agent stopping) leaves its records
            # unwritten: the next pass reads them from the runtime again.
            self._unwritten.pop(capsule.uuid, None)

    async def _converge(self, capsule: Capsule) -> None:
        if not capsule.addresses:
            await self._set_capsule(capsule, task_state=TaskState.NETWORK_ATTACHING)
        fresh = capsule.sandbox_id is None
        first = await self._first_sandbox(capsule) if fresh else None
        existing: dict[str, cri.Container] = {}
        if first is not None:
            sandbox_id, sandbox_spec = first
        else:
            sandbox_id, sandbox_spec, existing = await self._adopt_or_make_sandbox(capsule, fresh)
        # Nothing reads it before the containers exist: it goes with the pass's next write.
        self._record_capsule(capsule, sandbox_id=sandbox_id)

        if capsule.desired_state is DesiredState.STOPPED:
            for container in capsule.containers:
                await self._ensure_stopped(
                    capsule, container, sandbox_id, sandbox_spec, existing.get(container.uuid)
                )
            await self._summarize(capsule)
            return
        for container in capsule.init_containers:
            done = await self._run_init(
                capsule, container, sandbox_id, sandbox_spec, existing.get(container.uuid)
            )
            if not done:
                return
        for container in capsule.containers:
            await self._ensure_running(
                capsule, container, sandbox_id, sandbox_spec, existing.get(container.uuid)
            )
        if capsule.pending_signal is not None:
            await self._send_signal(capsule, capsule.pending_signal)
        await self._summarize(capsule)

    async def _first_sandbox(self, capsule: Capsule) -> tuple[str, cri.SandboxSpec] | None:
        """For a capsule that never had a sandbox: its sandbox, its ports and its images at once.

        containerd calls the CNI plugin some 15 ms into RunPodSandbox, and the CNI daemon's ADD
        waits (bounded) until the ports exist and the firewall enforces them, so the sandbox need
        not wait for the allocation. Returns None when the runtime already holds a sandbox of
        that name (a pass that asked for it was cut short before recording it): the caller lists
        the capsule's sandboxes and adopts it.
        """
        sandbox_spec = self._sandbox_spec(capsule, 0)
        Path(sandbox_spec.log_directory).mkdir(parents=True, exist_ok=True)
        sandbox = asyncio.ensure_future(self._run_first_sandbox(sandbox_spec))
        try:
            _raise_first_failure(
                await asyncio.gather(
                    self._allocate_ports(capsule),
                    self._pull_images(capsule, list(capsule.all_containers())),
                    return_exceptions=True,
                )
            )
        except BaseException as failure:
            # Its ADD would wait for ports that will not come, or it would run without images:
            # containerd undoes a cancelled RunPodSandbox; one made before the cancellation came
            # is removed, so that a capsule that failed here holds no sandbox (when the agent
            # stops instead, the next pass adopts it).
            sandbox.cancel()
            (made,) = await asyncio.gather(sandbox, return_exceptions=True)
            if isinstance(made, str) and isinstance(failure, Exception):
                with contextlib.suppress(CriError, RetryLater):
                    await self._remove_sandbox(capsule.uuid, made)
            raise
        sandbox_id = await sandbox
        if sandbox_id is None:
            log.info("the capsule's first sandbox exists already: adopting", capsule=capsule.uuid)
            return None
        log.info("sandbox running", capsule=capsule.uuid, sandbox=sandbox_id)
        return sandbox_id, sandbox_spec

    async def _run_first_sandbox(self, spec: cri.SandboxSpec) -> str | None:
        """RunPodSandbox of a capsule's first sandbox; None when its name is taken already."""
        try:
            return await self._run_sandbox(spec)
        except CriError as exc:
            if name_taken(exc):
                return None
            raise classify(exc, _STARTING_SANDBOX) from exc

    async def _adopt_or_make_sandbox(
        self, capsule: Capsule, fresh: bool
    ) -> tuple[str, cri.SandboxSpec, dict[str, cri.Container]]:
        """The capsule's ready sandbox (made when there is none, other ones removed) and the
        containers in it, newest attempt of each, from what the runtime reports."""
        # The ports and the runtime's sandboxes do not depend on each other: asked for at once.
        # A fresh capsule (its first sandbox was found made already) has its ports and images.
        steps: list[Awaitable[Any]] = [
            self._cri_do(
                "listing the capsule's sandboxes",
                self._cri.list_pod_sandboxes(labels.capsule_selector(capsule.uuid)),
            ),
        ]
        if not fresh:
            steps.append(self._allocate_ports(capsule))
        results = await asyncio.gather(*steps, return_exceptions=True)
        _raise_first_failure(results)
        sandboxes = cast(list[cri.PodSandbox], results[0])
        ready = [s for s in sandboxes if s.state is cri.SandboxState.READY]
        current = max(ready, key=lambda s: (s.attempt, s.created_at), default=None)
        for stale in sandboxes:
            if stale is not current:
                log.info("removing stale sandbox", capsule=capsule.uuid, sandbox=stale.id)
                await self._remove_sandbox(capsule.uuid, stale.id)

        existing: dict[str, cri.Container] = {}
        if current is not None:
            for c in await self._cri_do(
                "listing the capsule's containers",
                self._cri.list_containers(sandbox_id=current.id),
            ):
                uuid = c.labels.get(labels.CONTAINER, "")
                if uuid not in existing or c.attempt > existing[uuid].attempt:
                    existing[uuid] = c

        missing = [c for c in capsule.all_containers() if c.uuid not in existing]
        if missing and not fresh:
            await self._pull_images(capsule, missing)

        if current is not None:
            return current.id, self._sandbox_spec(capsule, current.attempt), existing
        if capsule.status is Status.RUNNING:
            log.warning("capsule lost its sandbox; making a new one", capsule=capsule.uuid)
        attempt = max((s.attempt for s in sandboxes), default=-1) + 1
        sandbox_spec = self._sandbox_spec(capsule, attempt)
        Path(sandbox_spec.log_directory).mkdir(parents=True, exist_ok=True)
        sandbox_id = await self._while_written(
            capsule,
            self._cri_do(_STARTING_SANDBOX, self._run_sandbox(sandbox_spec)),
            task_state=TaskState.CONTAINER_CREATING,
        )
        log.info("sandbox running", capsule=capsule.uuid, sandbox=sandbox_id)
        return sandbox_id, sandbox_spec, existing

    async def _pull_images(self, capsule: Capsule, containers: list[Container]) -> None:
        """Makes the containers' images present; the capsule says image_pulling while a pull
        runs (an image already present is no pull)."""

        async def pulling() -> None:
            await self._set_capsule(capsule, task_state=TaskState.IMAGE_PULLING)

        pulls = {(c.spec.image, c.spec.image_pull_policy, c.spec.registry_id) for c in containers}
        _raise_first_failure(
            await asyncio.gather(
                *(
                    self._images.ensure(image, policy, capsule.uuid, registry_id, pulling)
                    for image, policy, registry_id in pulls
                ),
                return_exceptions=True,
            )
        )

    async def _run_init(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        found: cri.Container | None,
    ) -> bool:
        """Runs an init container to completion; False while it runs (or waits to be retried)."""
        container_id = found.id if found else None
        while True:
            status = await self._status(container_id)
            if status is None:
                container_id = await self._create(capsule, container, sandbox_id, sandbox_spec, 0)
            elif status.state is cri.ContainerState.CREATED and not _recorded(container, status):
                container_id = await self._recreate(
                    capsule, container, sandbox_id, sandbox_spec, status
                )
            elif status.state is cri.ContainerState.CREATED:
                await self._start(capsule, container, sandbox_id, status.id)
            elif status.state is cri.ContainerState.RUNNING:
                self._record_running(container, status)
                await self._set_capsule(capsule, task_state=TaskState.CONTAINER_STARTING)
                if not await self._wait_exit(status.id, _INIT_WAIT_S):
                    return False
            elif _start_cut_short(status):
                container_id = await self._start_again(
                    capsule, container, sandbox_id, sandbox_spec, status
                )
            elif status.state is cri.ContainerState.EXITED:
                self._record_exit(container, status)
                if status.exit_code == 0:
                    return True
                if capsule.spec.restart_policy is RestartPolicy.NEVER:
                    raise CapsuleFailed(
                        f"init container {container.spec.name!r} exited with code "
                        f"{status.exit_code}{_why(status)}"
                    )
                if not await self._restart_due(capsule, container):
                    return False
                container_id = await self._replace(
                    capsule, container, sandbox_id, sandbox_spec, status
                )
            else:
                raise RetryLater(f"init container {container.spec.name!r} is in an unknown state")

    async def _ensure_running(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        found: cri.Container | None,
    ) -> None:
        status = await self._status(found.id if found else None)
        if status is not None and labels.generation(status.labels) < capsule.generation:
            # Started before the tenant's latest start or reboot: stopped if it runs, replaced
            # once exited, whatever the restart policy (one that never ran is just started).
            if status.state is cri.ContainerState.RUNNING:
                status = await self._stop(capsule, container, status)
            if status is not None and status.state is cri.ContainerState.EXITED:
                self._record_exit(container, status)
                await self._replace(capsule, container, sandbox_id, sandbox_spec, status, 0)
                return
        if status is None:
            container_id = await self._create(capsule, container, sandbox_id, sandbox_spec, 0)
            await self._start(capsule, container, sandbox_id, container_id)
        elif status.state is cri.ContainerState.CREATED:
            container_id = status.id
            if not _recorded(container, status):
                container_id = await self._recreate(
                    capsule, container, sandbox_id, sandbox_spec, status
                )
            await self._start(capsule, container, sandbox_id, container_id)
        elif status.state is cri.ContainerState.RUNNING:
            self._record_running(container, status)
        elif _start_cut_short(status):
            await self._start_again(capsule, container, sandbox_id, sandbox_spec, status)
        elif status.state is cri.ContainerState.EXITED:
            self._record_exit(container, status)
            if capsule.spec.restarts(status.exit_code, container.restart_count) and (
                await self._restart_due(capsule, container)
            ):
                await self._replace(capsule, container, sandbox_id, sandbox_spec, status)
        else:
            raise RetryLater(f"container {container.spec.name!r} is in an unknown state")

    async def _ensure_stopped(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        found: cri.Container | None,
    ) -> None:
        """A single container created but not started, or stopped: what the tenant asked."""
        status = await self._status(found.id if found else None)
        if status is None:
            await self._create(capsule, container, sandbox_id, sandbox_spec, 0)
            return
        if status.state is cri.ContainerState.RUNNING:
            status = await self._stop(capsule, container, status)
            if status is None:
                return  # gone as it stopped: nothing of it to record
        if status.state is cri.ContainerState.EXITED:
            self._record_exit(container, status)
        elif status.state is cri.ContainerState.CREATED and not _recorded(container, status):
            await self._recreate(capsule, container, sandbox_id, sandbox_spec, status)
        elif status.state is cri.ContainerState.CREATED:
            self._record(container, cri_container_id=status.id, status=Status.CREATED)
        else:
            raise RetryLater(f"container {container.spec.name!r} is in an unknown state")

    async def _stop(
        self, capsule: Capsule, container: Container, status: cri.ContainerStatus
    ) -> cri.ContainerStatus | None:
        """Stops a running container within the stop timeout; its status afterwards."""
        # What the pass recorded goes out before a call that may take the whole grace period.
        await self._set_capsule(capsule)
        timeout = capsule.stop_timeout
        if timeout is None:
            timeout = self._settings.stop_grace_period
        await self._cri_do(
            f"stopping container {container.spec.name!r}",
            self._cri.stop_container(status.id, timeout),
        )
        log.info("container stopped", capsule=capsule.uuid, container=container.uuid)
        return await self._status(status.id)

    async def _send_signal(self, capsule: Capsule, name: str) -> None:
        """Sends the signal the tenant asked for (kill) to the containers' processes. CRI has no
        call for it: the runtime's verbose status names the process, which the agent signals."""
        for container in capsule.containers:
            if container.cri_container_id is None or container.status is not Status.RUNNING:
                continue
            pid = await self._cri_do(
                f"finding the process of container {container.spec.name!r}",
                self._cri.container_pid(container.cri_container_id),
            )
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.Signals[name])
            log.info("signal sent", capsule=capsule.uuid, container=container.uuid, signal=name)
        await self._store.capsules.signal_sent(capsule.uuid, name)

    async def _summarize(self, capsule: Capsule) -> None:
        """The capsule's status from its containers' statuses."""
        containers = capsule.containers
        if capsule.spec.kind is CapsuleKind.CONTAINER:
            # A single container's status is its container's, as Zun shows it.
            (container,) = containers
            await self._set_capsule(
                capsule,
                status=container.status,
                status_reason=container.status_reason,
                task_state=None,
            )
            if capsule.spec.auto_remove and container.status is Status.STOPPED:
                log.info("container exited: removing it (auto_remove)", capsule=capsule.uuid)
                await self._store.capsules.request_delete(capsule.uuid)
            return
        failed = next((c for c in containers if c.status is Status.ERROR), None)
        if failed is not None:
            await self._set_capsule(
                capsule,
                status=Status.ERROR,
                status_reason=f"container {failed.spec.name!r}: {failed.status_reason}",
                task_state=None,
            )
        elif all(c.status is Status.STOPPED for c in containers):
            bad = next((c for c in containers if c.exit_code), None)
            if bad is None:
                await self._set_capsule(
                    capsule, status=Status.STOPPED, status_reason=None, task_state=None
                )
            else:
                await self._set_capsule(
                    capsule,
                    status=Status.ERROR,
                    status_reason=f"container {bad.spec.name!r} exited with code {bad.exit_code}",
                    task_state=None,
                )
        else:
            await self._set_capsule(
                capsule, status=Status.RUNNING, status_reason=None, task_state=None
            )

    # ---- containers ----

    async def _status(self, container_id: str | None) -> cri.ContainerStatus | None:
        if container_id is None:
            return None
        try:
            return await self._cri.container_status(container_id)
        except CriError as exc:
            if exc.code == "NOT_FOUND" or "not found" in exc.message.lower():
                return None
            raise classify(exc, "asking a container's status") from exc

    async def _create(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        attempt: int,
    ) -> str:
        spec = self._container_spec(capsule, container, attempt)
        container_id = await self._while_written(
            capsule,
            self._in_sandbox(
                sandbox_id,
                f"creating container {container.spec.name!r}",
                self._cri.create_container(sandbox_id, spec, sandbox_spec),
            ),
            task_state=TaskState.CONTAINER_CREATING,
        )
        self._record(
            container, cri_container_id=container_id, status=Status.CREATED, status_reason=None
        )
        return container_id

    async def _start(
        self, capsule: Capsule, container: Container, sandbox_id: str, container_id: str
    ) -> None:
        await self._while_written(
            capsule,
            self._in_sandbox(
                sandbox_id,
                f"starting container {container.spec.name!r}",
                self._cri.start_container(container_id),
            ),
            task_state=TaskState.CONTAINER_STARTING,
        )
        log.info(
            "container started",
            capsule=capsule.uuid,
            container=container.uuid,
            name=container.spec.name,
        )
        self._record(
            container,
            cri_container_id=container_id,
            status=Status.RUNNING,
            status_reason=None,
            started_at=utcnow(),
            finished_at=None,
            exit_code=None,
        )

    async def _replace(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        exited: cri.ContainerStatus,
        restarts: int | None = None,
    ) -> str:
        """Restarts an exited container as a new attempt (CRI containers are not restartable),
        ``restarts`` its count of restarts from then on: one more by default, 0 when the tenant
        asked for it (a start or a reboot begins a new count)."""
        spec = container.spec
        # What the pass recorded goes out before a pull, which may take minutes.
        await self._set_capsule(capsule)
        await self._images.ensure(
            spec.image, spec.image_pull_policy, capsule.uuid, spec.registry_id
        )
        await self._remove_container(
            capsule, exited.id, f"removing exited container {container.spec.name!r}"
        )
        if restarts is None:
            restarts = container.restart_count + 1
        container_id = await self._create(
            capsule, container, sandbox_id, sandbox_spec, exited.attempt + 1
        )
        self._record(container, restart_count=restarts)
        await self._start(capsule, container, sandbox_id, container_id)
        log.info(
            "container restarted",
            capsule=capsule.uuid,
            container=container.uuid,
            restarts=restarts,
            exit_code=exited.exit_code,
        )
        return container_id

    async def _recreate(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        created: cri.ContainerStatus,
    ) -> str:
        """Makes again a created container whose creation no pass recorded: its CreateContainer
        was cut short (the agent killed, or the call timed out), and containerd 1.6 finishes
        such a call with whatever its cancelled steps returned; it can take the sandbox's
        namespaces from pid 0 (``/proc/0/ns/...``), which no start gets past."""
        log.info(
            "replacing a container whose creation was cut short",
            capsule=capsule.uuid,
            container=container.uuid,
            cri_container=created.id,
        )
        await self._remove_container(
            capsule,
            created.id,
            f"removing container {container.spec.name!r} whose creation was cut short",
        )
        return await self._create(capsule, container, sandbox_id, sandbox_spec, created.attempt)

    async def _start_again(
        self,
        capsule: Capsule,
        container: Container,
        sandbox_id: str,
        sandbox_spec: cri.SandboxSpec,
        cut_short: cri.ContainerStatus,
    ) -> str:
        """Starts, as a new attempt, a container whose start the agent's crash cut short (see
        :func:`_start_cut_short`): the tenant's program never ran, so it is no restart, whatever
        the restart policy."""
        log.info(
            "starting again a container whose start was cut short",
            capsule=capsule.uuid,
            container=container.uuid,
            cri_container=cut_short.id,
        )
        return await self._replace(
            capsule, container, sandbox_id, sandbox_spec, cut_short, container.restart_count
        )

    async def _remove_container(self, capsule: Capsule, container_id: str, doing: str) -> None:
        try:
            await self._cri.remove_container(container_id)
        except CriError as exc:
            await self._free_if_stranded(capsule.uuid, exc, doing)
            raise classify(exc, doing) from exc

    async def _free_if_stranded(self, capsule_uuid: str | None, exc: CriError, doing: str) -> None:
        """When the runtime refused a removal because containerd still holds a task of a
        container that CRI calls exited (see :func:`stranded_task`), frees that task and raises
        RetryLater: the removal goes through at the next try."""
        container_id = stranded_task(exc)
        if container_id is None:
            return
        log.warning(
            "freeing the task containerd keeps behind an exited container",
            capsule=capsule_uuid,
            cri_container=container_id,
        )
        try:
            await self._free_stranded_task(container_id)
        except StrandedTaskError as failure:
            raise RetryLater(f"{doing}: {failure}") from failure
        raise RetryLater(
            f"{doing}: containerd still held the task of exited container {container_id}; "
            "freed it, to remove again"
        ) from exc

    async def _in_sandbox(self, sandbox_id: str, doing: str, call: Awaitable[T]) -> T:
        """Awaits a CRI call on a container of the sandbox; a failure the tenant would be blamed
        for is retried instead when the sandbox is no longer ready (its task exited or was
        lost, or it is gone): the next pass replaces the sandbox."""
        try:
            return await self._cri_do(doing, call)
        except CapsuleFailed as failure:
            if await self._sandbox_ready(sandbox_id, doing):
                raise
            raise RetryLater(
                f"{failure} (the capsule's sandbox is not ready: a new one replaces it)"
            ) from failure

    async def _sandbox_ready(self, sandbox_id: str, doing: str) -> bool:
        try:
            status = await self._cri.pod_sandbox_status(sandbox_id)
        except CriNotFound:
            return False
        except CriError as exc:
            raise classify(exc, f"{doing}: asking the status of its sandbox") from exc
        return status.state is cri.SandboxState.READY

    async def _restart_due(self, capsule: Capsule, container: Container) -> bool:
        """Whether the back-off after the container's last exit has passed; if not, retry then."""
        delay = min(
            self._settings.restart_backoff_base * 2**container.restart_count,
            self._settings.restart_backoff_max,
        )
        finished = container.finished_at or utcnow()
        wait = (finished + timedelta(seconds=delay) - utcnow()).total_seconds()
        if wait <= 0:
            return True
        self._record(
            container,
            status=Status.RESTARTING,
            status_reason=f"back-off {delay:g}s after exit code {container.exit_code}",
        )
        self._retry_at(capsule.uuid, wait)
        return False

    async def _wait_exit(self, container_id: str, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
            status = await self._status(container_id)
            if status is None or status.state is cri.ContainerState.EXITED:
                return True
        return False

    def _record_running(self, container: Container, status: cri.ContainerStatus) -> None:
        self._record(
            container,
            cri_container_id=status.id,
            status=Status.RUNNING,
            status_reason=None,
            started_at=_time(status.started_at) or container.started_at,
        )

    def _record_exit(self, container: Container, status: cri.ContainerStatus) -> None:
        self._record(
            container,
            cri_container_id=status.id,
            status=Status.STOPPED,
            status_reason=_why(status).strip(" ()") or None,
            exit_code=status.exit_code,
            finished_at=_time(status.finished_at) or utcnow(),
        )

    def _record(self, container: Container, **values: Any) -> None:
        """Keeps the container fields that changed in ``container``, to be written with the
        capsule's next write (:meth:`_set_capsule`)."""
        changed = {k: v for k, v in values.items() if getattr(container, k) != v}
        if changed:
            unwritten = self._unwritten_fields(container.capsule_uuid).containers
            unwritten.setdefault(container.uuid, {}).update(changed)
            for key, value in changed.items():
                setattr(container, key, value)

    def _record_capsule(self, capsule: Capsule, **values: Any) -> None:
        """Keeps the capsule fields that changed in ``capsule``, to be written with its next
        write (:meth:`_set_capsule`)."""
        changed = {k: v for k, v in values.items() if getattr(capsule, k) != v}
        if changed:
            self._unwritten_fields(capsule.uuid).capsule.update(changed)
            for key, value in changed.items():
                setattr(capsule, key, value)

    async def _set_capsule(self, capsule: Capsule, **values: Any) -> None:
        """Writes the capsule fields that changed, unless the capsule is being deleted, and
        the fields recorded since the last write, in one transaction. Recorded capsule fields
        alone do not call for a write: they wait for the next one, or the end of the pass."""
        await self._write(capsule, values, end_of_pass=False)

    async def _while_written(self, capsule: Capsule, step: Awaitable[T], **values: Any) -> T:
        """Runs ``step``, a call that changes the runtime, while the capsule's fields (and what
        the pass recorded) are written: the write is off the capsule's path. A write refused
        because the tenant deleted the capsule meanwhile (Superseded) lets the call end all the
        same; the teardown that follows removes what it made."""

        async def write() -> None:
            # One turn later: the call's request is sent first (gRPC sends it from a task of
            # its own), and the write (on the event loop with SQLite) runs while the runtime
            # works on it, instead of before.
            await asyncio.sleep(0)
            await self._set_capsule(capsule, **values)

        done, written = await asyncio.gather(step, write(), return_exceptions=True)
        _raise_first_failure([written, done])
        return cast(T, done)

    async def _run_sandbox(self, spec: cri.SandboxSpec) -> str:
        async with self._sandbox_slots:
            return await self._cri.run_pod_sandbox(spec)

    async def _write_recorded(self, capsule: Capsule) -> None:
        """At the end of a pass: writes whatever the pass recorded and did not write yet."""
        await self._write(capsule, {}, end_of_pass=True)

    async def _write(self, capsule: Capsule, values: dict[str, Any], end_of_pass: bool) -> None:
        changed = {k: v for k, v in values.items() if getattr(capsule, k) != v}
        unwritten = self._unwritten.get(capsule.uuid, _Unwritten())
        if not changed and not unwritten.containers and not (end_of_pass and unwritten.capsule):
            return
        self._unwritten.pop(capsule.uuid, None)
        if not await self._store.capsules.update_status(
            capsule.uuid,
            expect=capsule.desired_state,
            containers=unwritten.containers or None,
            **unwritten.capsule,
            **changed,
        ):
            raise Superseded(capsule.uuid)
        for key, value in changed.items():
            setattr(capsule, key, value)

    def _unwritten_fields(self, capsule_uuid: str) -> _Unwritten:
        return self._unwritten.setdefault(capsule_uuid, _Unwritten())

    # ---- teardown ----

    async def teardown(self, capsule: Capsule) -> bool:
        """Stops and removes everything of the capsule, then its records; False to retry later."""
        try:
            sandboxes = await self._stop_containers(capsule)
            _raise_first_failure(
                await asyncio.gather(
                    *(self._remove_sandbox(capsule.uuid, s.id) for s in sandboxes),
                    return_exceptions=True,
                )
            )
        except (CriError, RetryLater) as exc:
            why = exc.message if isinstance(exc, CriError) else str(exc)
            reason = f"deleting the capsule: {why}"
            log.warning("capsule teardown will be retried", capsule=capsule.uuid, reason=reason)
            await self._store.capsules.update_status(
                capsule.uuid, expect=capsule.desired_state, status_reason=reason
            )
            self._retry_at(capsule.uuid, _RETRY_S)
            return False
        shutil.rmtree(self._log_directory(capsule.uuid), ignore_errors=True)
        await self._store.capsules.remove(capsule.uuid)
        log.info("capsule deleted", capsule=capsule.uuid)
        return True

    async def _stop_containers(self, capsule: Capsule) -> list[cri.PodSandbox]:
        """Stops the capsule's running containers, each within its grace period, all at once;
        returns the capsule's sandboxes.

        The containers that the records say run are stopped at once, while the runtime is listed
        by the capsule's labels: the listing finds what the records miss (a crash between a
        runtime call and its record, a stale sandbox), and what it finds running is stopped too.
        """
        recorded = {
            c.cri_container_id
            for c in capsule.all_containers()
            if c.cri_container_id is not None and c.status is Status.RUNNING
        }

        async def list_then_stop_unrecorded() -> list[cri.PodSandbox]:
            selector = labels.capsule_selector(capsule.uuid)
            containers, sandboxes = await asyncio.gather(
                self._cri.list_containers(labels=selector), self._cri.list_pod_sandboxes(selector)
            )
            unrecorded = [
                c.id
                for c in containers
                if c.state is cri.ContainerState.RUNNING and c.id not in recorded
            ]
            await self._stop_all(unrecorded)
            return sandboxes

        # The recorded stops first: their calls go out before the listing's.
        results = await asyncio.gather(
            self._stop_all(recorded), list_then_stop_unrecorded(), return_exceptions=True
        )
        _raise_first_failure(results)
        return cast(list[cri.PodSandbox], results[1])

    async def _stop_all(self, container_ids: Collection[str]) -> None:
        """Stops containers together, not one after another: their grace periods overlap."""
        grace = self._settings.stop_grace_period
        _raise_first_failure(
            await asyncio.gather(
                *(self._cri.stop_container(i, grace) for i in container_ids),
                return_exceptions=True,
            )
        )

    async def remove_orphan(self, sandbox: cri.PodSandbox) -> None:
        """Removes a sandbox whose capsule is not on this host (any more); a removal that fails
        is tried again by the next resync."""
        owner = sandbox.labels.get(labels.CAPSULE)
        log.warning(
            "removing a sandbox that belongs to no capsule of this host",
            sandbox=sandbox.id,
            capsule=owner,
        )
        try:
            await self._remove_sandbox(owner, sandbox.id)
        except (CriError, RetryLater) as exc:
            log.warning("orphan sandbox not removed yet", sandbox=sandbox.id, reason=str(exc))

    async def _remove_sandbox(self, capsule_uuid: str | None, sandbox_id: str) -> None:
        """Removes a sandbox; raises the runtime's CriError, or RetryLater once it freed a task
        that blocked the removal."""
        # RemovePodSandbox stops the sandbox first (its processes, then the CNI DEL) and removes
        # its containers too. A StopPodSandbox before it, as kubelet sends to keep stopped pods
        # around, would make containerd stop it twice: a second CNI DEL, a capsa-cni process.
        try:
            async with self._sandbox_slots:
                await self._cri.remove_pod_sandbox(sandbox_id)
        except CriError as exc:
            await self._free_if_stranded(capsule_uuid, exc, f"removing sandbox {sandbox_id}")
            raise

    # ---- specs ----

    def _log_directory(self, capsule_uuid: str) -> Path:
        return self._settings.pod_log_dir / capsule_uuid

    async def _allocate_ports(self, capsule: Capsule) -> None:
        try:
            await self._network.allocate_ports(
                capsule.uuid,
                capsule.project_id,
                self._settings.host,
                Attachment.from_annotations(capsule.spec.annotations),
            )
        except (NotFound, Ambiguous, RepeatedNetwork, SubnetFull, NoFreeCidr) as exc:
            raise CapsuleFailed(f"allocating the capsule's ports: {exc}") from exc

    def _sandbox_spec(self, capsule: Capsule, attempt: int) -> cri.SandboxSpec:
        ours = {
            labels.MANAGED: "true",
            labels.CAPSULE: capsule.uuid,
            labels.PROJECT: capsule.project_id,
        }
        return cri.SandboxSpec(
            name=capsule.uuid,
            namespace=capsule.project_id,
            uid=capsule.uuid,
            attempt=attempt,
            hostname=capsule.spec.sandbox_hostname,
            log_directory=str(self._log_directory(capsule.uuid)),
            labels={**capsule.spec.labels, **ours},
            annotations=dict(capsule.spec.annotations),
            runtime_handler=capsule.spec.runtime or self._settings.default_runtime,
            cgroup_parent=self._settings.cgroup_parent,
            privileged=capsule.spec.privileged,
            port_mappings=tuple(
                cri.PortMapping(
                    container_port=p.container_port,
                    host_port=p.host_port,
                    protocol=cri.Protocol(p.protocol.lower()),
                )
                for c in capsule.containers
                for p in c.spec.ports
                if p.host_port
            ),
        )

    def _container_spec(
        self, capsule: Capsule, container: Container, attempt: int
    ) -> cri.ContainerSpec:
        spec = container.spec
        (self._log_directory(capsule.uuid) / spec.name).mkdir(parents=True, exist_ok=True)
        return cri.ContainerSpec(
            name=spec.name,
            image=spec.image,
            attempt=attempt,
            command=spec.command,
            args=spec.args,
            working_dir=spec.workdir or "",
            env=spec.env,
            labels={
                labels.MANAGED: "true",
                labels.CAPSULE: capsule.uuid,
                labels.CONTAINER: container.uuid,
                labels.KIND: container.kind.value,
                labels.GENERATION: str(capsule.generation),
            },
            log_path=f"{spec.name}/{attempt}.log",
            tty=spec.tty,
            stdin=spec.stdin,
            privileged=spec.privileged,
            cpu_period=_CPU_PERIOD_US,
            cpu_quota=spec.cpu_millis * _CPU_PERIOD_US // 1000,
            cpu_shares=max(2, spec.cpu_millis * 1024 // 1000),
            memory_limit_bytes=spec.memory_mb * _MIB,
        )

    async def _cri_do(self, doing: str, call: Awaitable[T]) -> T:
        """Awaits a CRI call; a failure becomes CapsuleFailed or RetryLater, worded by ``doing``."""
        try:
            return await call
        except CriError as exc:
            raise classify(exc, doing) from exc


def settled(capsule: Capsule) -> bool:
    """Whether the capsule waits for nothing but the tenant: it ended (Error, or Stopped for
    good), or it is a single container created or stopped as asked, and no action is pending."""
    if capsule.task_state is not None or capsule.pending_signal is not None:
        return False
    if capsule.status in (Status.ERROR, Status.STOPPED):
        return True
    return capsule.desired_state is DesiredState.STOPPED and capsule.status is Status.CREATED


def _start_cut_short(status: cri.ContainerStatus) -> bool:
    """Whether the container never ran because its StartContainer call was cancelled by its
    caller: the agent killed mid-call, whose connection closing cancels the call. containerd 1.6
    then marks the container exited with code 128 (StartError), and its message says that the
    call's context was canceled, or that the shim's start, which that context bounds, was
    killed. No failure of the tenant's program or image reads so (those come from runc), and a
    call that timed out says "deadline exceeded" instead, so it is not mistaken for one."""
    return (
        status.state is cri.ContainerState.EXITED
        and status.reason == "StartError"
        and _CUT_SHORT.search(status.message) is not None
    )


def _recorded(container: Container, status: cri.ContainerStatus) -> bool:
    """Whether the runtime's container is the one the capsule's records name: a pass saw the
    call that made it return."""
    return container.cri_container_id == status.id


def _time(ns: int) -> datetime | None:
    if ns <= 0:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).replace(tzinfo=None)


def _why(status: cri.ContainerStatus) -> str:
    detail = " ".join(p for p in (status.reason, status.message) if p and p != "Completed")
    return f" ({detail})" if detail else ""


def _raise_first_failure(results: Sequence[object]) -> None:
    """Raises the failure of steps run side by side, if one failed: one the tenant must fix
    before one that may pass."""
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in sorted(failures, key=lambda f: not isinstance(f, CapsuleFailed)):
        raise failure

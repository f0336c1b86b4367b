"""Fixtures shared by unit tests: a real SQLite store in a temporary directory."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from capsa.model.capsule import Capsule, CapsuleSpec, Container, ContainerKind, ContainerSpec
from capsa.model.network import AllocationPool, HostNetworkView
from capsa.store import Store

CapsuleFactory = Callable[..., Capsule]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'capsa.db'}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def make_capsule() -> CapsuleFactory:
    """Builds an unsaved capsule; keyword arguments override the defaults."""

    def build(
        name: str | None = None,
        project_id: str = "p1",
        cpu_millis: int = 100,
        memory_mb: int = 64,
        containers: int = 1,
        init_containers: int = 0,
    ) -> Capsule:
        capsule_uuid = str(uuid.uuid4())

        def spec(prefix: str, i: int) -> ContainerSpec:
            return ContainerSpec(
                name=f"{prefix}{i}", image="busybox", cpu_millis=cpu_millis, memory_mb=memory_mb
            )

        inits = [spec("init", i) for i in range(init_containers)]
        apps = [spec("app", i) for i in range(containers)]
        capsule = Capsule(
            uuid=capsule_uuid,
            project_id=project_id,
            user_id="u1",
            spec=CapsuleSpec(
                name=name or f"c-{capsule_uuid[:8]}",
                containers=tuple(apps),
                init_containers=tuple(inits),
            ),
        )
        capsule.init_containers = [
            Container(str(uuid.uuid4()), capsule_uuid, project_id, "u1", ContainerKind.INIT, i, s)
            for i, s in enumerate(inits)
        ]
        capsule.containers = [
            Container(str(uuid.uuid4()), capsule_uuid, project_id, "u1", ContainerKind.APP, i, s)
            for i, s in enumerate(apps, start=len(inits))
        ]
        return capsule

    return build


async def network_with_subnet(
    store: Store,
    project_id: str,
    name: str,
    cidr: str,
    pool: tuple[str, str] | None = None,
    mtu: int = 1500,
) -> str:
    """A network of the project with one subnet (gateway .1; ``pool`` its only addresses, else
    all); returns the network's id."""
    network = await store.networks.create_network(project_id=project_id, name=name, mtu=mtu)
    subnet = ipaddress.IPv4Network(cidr)
    await store.networks.create_subnet(
        network_id=network.id,
        project_id=project_id,
        cidr=subnet,
        gateway_ip=subnet.network_address + 1,
        allocation_pools=[]
        if pool is None
        else [AllocationPool(ipaddress.IPv4Address(pool[0]), ipaddress.IPv4Address(pool[1]))],
    )
    return network.id


async def host_view(store: Store, host: str) -> HostNetworkView:
    """The network agent's view of ``host``, read whole."""
    _, view = await store.ports.host_view_if_changed(host, None)
    assert view is not None
    return view

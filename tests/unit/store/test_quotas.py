from __future__ import annotations

import asyncio

import pytest
from tests.unit.conftest import CapsuleFactory

from capsa.model.quota import QuotaLimits, QuotaResource, QuotaUsage
from capsa.store import Store
from capsa.store.quotas import OverQuota

DEFAULTS = QuotaLimits(containers=40, cpu=20, memory=51200, disk=100)


async def test_limits_are_the_projects_else_the_default_class_else_the_configured(
    store: Store,
) -> None:
    assert await store.quotas.project_limits("p1", DEFAULTS) == DEFAULTS
    await store.quotas.set_class_limits("default", {QuotaResource.CPU: 8}, DEFAULTS)
    await store.quotas.set_class_limits("gold", {QuotaResource.MEMORY: 1}, DEFAULTS)
    updated = await store.quotas.set_project_limits(
        "p1", {QuotaResource.CONTAINERS: 5, QuotaResource.MEMORY: 2048}, DEFAULTS
    )
    assert updated == QuotaLimits(containers=5, cpu=8, memory=2048, disk=100)
    assert await store.quotas.project_limits("p1", DEFAULTS) == updated
    # Other projects and classes keep theirs; setting a limit again replaces it.
    assert await store.quotas.project_limits("p2", DEFAULTS) == QuotaLimits(40, 8, 51200, 100)
    assert await store.quotas.class_limits("gold", DEFAULTS) == QuotaLimits(40, 20, 1, 100)
    await store.quotas.set_project_limits("p1", {QuotaResource.CONTAINERS: -1}, DEFAULTS)
    assert (await store.quotas.project_limits("p1", DEFAULTS)).containers == -1
    await store.quotas.reset_project_limits("p1")
    assert await store.quotas.project_limits("p1", DEFAULTS) == QuotaLimits(40, 8, 51200, 100)


async def test_usage_counts_every_capsule_of_the_project_until_its_records_go(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    first = make_capsule(cpu_millis=250, memory_mb=64, containers=2)
    await store.capsules.create(first)
    await store.capsules.create(make_capsule(cpu_millis=100, memory_mb=32))
    await store.capsules.create(make_capsule(project_id="p2"))
    assert await store.quotas.usage("p1") == QuotaUsage(containers=2, cpu_millis=600, memory_mb=160)
    # Placed and being deleted: still counted; removed by its agent: no longer.
    await store.hosts.register("h1", "http://h1", 4000, 4096, ("runc",))
    assert await store.hosts.claim(first.uuid, "h1", 500, 128)
    await store.capsules.request_delete(first.uuid)
    assert (await store.quotas.usage("p1")).containers == 2
    await store.capsules.remove(first.uuid)
    assert await store.quotas.usage("p1") == QuotaUsage(containers=1, cpu_millis=100, memory_mb=32)


async def test_an_unplaced_capsule_gives_its_usage_back_at_delete(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule()
    await store.capsules.create(capsule)
    await store.capsules.request_delete(capsule.uuid)
    assert await store.quotas.usage("p1") == QuotaUsage()


async def test_a_create_past_the_quota_stores_nothing_and_says_why(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    limits = QuotaLimits(containers=1, cpu=1, memory=100, disk=0)
    await store.capsules.create(make_capsule(cpu_millis=600, memory_mb=60), limits)
    with pytest.raises(OverQuota) as refused:
        await store.capsules.create(make_capsule(cpu_millis=600, memory_mb=10), limits)
    assert [e.resource for e in refused.value.excesses] == [
        QuotaResource.CONTAINERS,
        QuotaResource.CPU,
    ]
    assert refused.value.project_id == "p1"
    assert await store.capsules.count(None) == 1


async def test_concurrent_creates_never_pass_the_quota(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    # Two stores on one file write as two processes would: only the database orders them.
    other = Store(store.db.url)
    await other.open()
    limits = QuotaLimits(containers=5)
    try:
        results = await asyncio.gather(
            *((store, other)[i % 2].capsules.create(make_capsule(), limits) for i in range(20)),
            return_exceptions=True,
        )
    finally:
        await other.close()
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert all(isinstance(r, OverQuota) for r in results if isinstance(r, BaseException))
    assert await store.capsules.count("p1") == 5

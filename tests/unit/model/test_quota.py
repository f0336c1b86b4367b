from __future__ import annotations

from capsa.model.quota import QuotaLimits, QuotaResource, QuotaUsage, exceeded


def test_a_request_within_every_limit_passes() -> None:
    limits = QuotaLimits(containers=5, cpu=2, memory=1024, disk=10)
    in_use = QuotaUsage(containers=4, cpu_millis=1500, memory_mb=512)
    assert exceeded(limits, in_use, QuotaUsage(containers=1, cpu_millis=500, memory_mb=512)) == []


def test_each_resource_past_its_limit_is_named_in_zuns_order_and_units() -> None:
    limits = QuotaLimits(containers=5, cpu=2, memory=1024, disk=10)
    in_use = QuotaUsage(containers=5, cpu_millis=1500, memory_mb=512)
    excesses = exceeded(limits, in_use, QuotaUsage(containers=1, cpu_millis=501, memory_mb=512))
    assert [e.resource for e in excesses] == [QuotaResource.CONTAINERS, QuotaResource.CPU]
    cpu = excesses[1]
    assert (cpu.limit, cpu.in_use, cpu.requested) == (2, 1.5, 0.501)


def test_minus_one_is_unlimited_and_zero_allows_nothing() -> None:
    huge = QuotaUsage(containers=10**6, cpu_millis=10**9, memory_mb=10**9)
    assert exceeded(QuotaLimits(), huge, huge) == []
    refused = exceeded(QuotaLimits(containers=0), QuotaUsage(), QuotaUsage(containers=1))
    assert [e.resource for e in refused] == [QuotaResource.CONTAINERS]


def test_a_resource_the_request_does_not_use_never_refuses_it() -> None:
    # The project is already over its memory limit (lowered meanwhile); a capsule of no disk and
    # within the other limits is still refused only for what it adds.
    limits = QuotaLimits(memory=100, disk=0)
    excesses = exceeded(limits, QuotaUsage(memory_mb=200), QuotaUsage(containers=1, memory_mb=1))
    assert [e.resource for e in excesses] == [QuotaResource.MEMORY]

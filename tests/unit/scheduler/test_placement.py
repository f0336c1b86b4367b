from __future__ import annotations

from capsa.model.host import Host
from capsa.scheduler.placement import Request, explain_no_fit, fits, rank


def _host(
    name: str,
    cpu_free: int = 1000,
    mem_free: int = 1000,
    runtimes: tuple[str, ...] = ("runc",),
    disabled: bool = False,
) -> Host:
    return Host(
        name=name,
        uuid=name,
        agent_url="",
        cpu_millis=2000,
        memory_mb=2000,
        cpu_millis_used=2000 - cpu_free,
        memory_mb_used=2000 - mem_free,
        runtimes=runtimes,
        disabled=disabled,
        heartbeat_at=None,
    )


def test_fits_checks_room_runtime_and_disabled() -> None:
    request = Request(500, 500, None)
    assert fits(_host("a"), request)
    assert not fits(_host("a", cpu_free=499), request)
    assert not fits(_host("a", mem_free=499), request)
    assert not fits(_host("a", disabled=True), request)
    assert not fits(_host("a", runtimes=()), request)
    assert fits(_host("a", runtimes=("runc", "crun")), Request(1, 1, "crun"))
    assert not fits(_host("a"), Request(1, 1, "crun"))


def test_rank_prefers_the_host_with_the_most_free_share_of_its_scarcer_resource() -> None:
    hosts = [
        _host("cpu-rich-mem-poor", cpu_free=2000, mem_free=200),
        _host("balanced", cpu_free=1200, mem_free=1200),
        _host("full", cpu_free=0, mem_free=0),
    ]
    assert [h.name for h in rank(hosts, Request(100, 100, None))] == [
        "balanced",
        "cpu-rich-mem-poor",
    ]


def test_reasons_say_what_is_missing() -> None:
    request = Request(1500, 64, "runc")
    assert "no compute host is up" in explain_no_fit([], request)
    assert "every host is disabled" in explain_no_fit([_host("a", disabled=True)], request)
    assert "offer the runtimes crun" in explain_no_fit([_host("a", runtimes=("crun",))], request)
    reason = explain_no_fit([_host("a", cpu_free=1000), _host("b", cpu_free=700)], request)
    assert "needs 1.5 cpu and 64 MiB on runc" in reason
    assert "(a) has 1 cpu and 1000 MiB free" in reason

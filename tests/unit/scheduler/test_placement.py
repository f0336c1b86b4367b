from __future__ import annotations

from capsa.model.host import Host, PlacementRequest
from capsa.scheduler.placement import HostChooser, explain_no_fit, fits


def Request(cpu_millis: int, memory_mb: int, runtime: str | None) -> PlacementRequest:  # noqa: N802
    return PlacementRequest("capsule", cpu_millis, memory_mb, runtime)


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


def test_the_chooser_takes_the_host_with_the_most_free_share_of_its_scarcer_resource() -> None:
    chooser = HostChooser(
        [
            _host("cpu-rich-mem-poor", cpu_free=2000, mem_free=200),
            _host("balanced", cpu_free=1200, mem_free=1200),
            _host("full", cpu_free=0, mem_free=0),
        ]
    )
    taken = chooser.take(Request(100, 100, None))
    assert taken is not None and taken.name == "balanced"
    assert chooser.hosts["balanced"].cpu_millis_free == 1100


def test_the_chooser_spreads_as_room_is_taken_and_gets_it_back() -> None:
    chooser = HostChooser([_host("a", cpu_free=1000), _host("b", cpu_free=900)])
    names = [h.name for h in (chooser.take(Request(300, 10, None)) for _ in range(5)) if h]
    # a (1000) -> b (900) -> a (700) -> b (600) -> a (400); then nothing has 300 left twice.
    assert names == ["a", "b", "a", "b", "a"]
    assert chooser.take(Request(300, 10, None)) is not None  # b: 300 left
    assert chooser.take(Request(300, 10, None)) is None
    chooser.give_back("a", Request(300, 10, None))
    taken = chooser.take(Request(300, 10, None))
    assert taken is not None and taken.name == "a"


def test_the_chooser_passes_over_hosts_that_do_not_fit_and_keeps_them() -> None:
    chooser = HostChooser([_host("roomy"), _host("crun-only", runtimes=("crun",), cpu_free=500)])
    first = chooser.take(Request(100, 10, "crun"))
    assert first is not None and first.name == "crun-only"
    second = chooser.take(Request(100, 10, None))
    assert second is not None and second.name == "roomy"
    assert chooser.take(Request(900, 10, "crun")) is None


def test_reasons_say_what_is_missing() -> None:
    request = Request(1500, 64, "runc")
    assert "no compute host is up" in explain_no_fit([], request)
    assert "every host is disabled" in explain_no_fit([_host("a", disabled=True)], request)
    assert "offer the runtimes crun" in explain_no_fit([_host("a", runtimes=("crun",))], request)
    reason = explain_no_fit([_host("a", cpu_free=1000), _host("b", cpu_free=700)], request)
    assert "needs 1.5 cpu and 64 MiB on runc" in reason
    assert "the host with the most room has 1 cpu and 1000 MiB free" in reason
    # Tenants read it: no host's name.
    assert "(a)" not in reason and " a " not in reason

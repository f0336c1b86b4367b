"""Calls from capsa's threads to the event loop: at once, or held until the thread answered."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from capsa.store import notify


async def _on_a_thread(work: Callable[[], None]) -> None:
    await asyncio.wait_for(asyncio.to_thread(work), 5)


async def test_a_call_from_a_thread_runs_on_the_loop() -> None:
    loop = asyncio.get_running_loop()
    ran_on: list[str] = []
    done = asyncio.Event()

    def record() -> None:
        ran_on.append(threading.current_thread().name)
        done.set()

    await _on_a_thread(lambda: notify.call_soon_on(loop, record))

    await asyncio.wait_for(done.wait(), 5)
    assert ran_on == [threading.current_thread().name]


async def test_held_calls_wait_for_their_release_and_run_in_order() -> None:
    loop = asyncio.get_running_loop()
    ran: list[int] = []
    release = threading.Event()
    held = threading.Event()

    def thread() -> None:
        notify.hold_wakeups()
        for number in range(3):
            notify.call_soon_on(loop, ran.append, number)
        held.set()
        # The loop turns meanwhile: nothing held may run before the release.
        assert release.wait(5)
        notify.release_wakeups()
        # Released: the next call goes at once again.
        notify.call_soon_on(loop, ran.append, 3)

    worker = asyncio.ensure_future(_on_a_thread(thread))
    assert await asyncio.to_thread(held.wait, 5)
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert ran == []

    release.set()
    await worker
    for _ in range(5):
        await asyncio.sleep(0)
    assert ran == [0, 1, 2, 3]


async def test_holding_is_per_thread() -> None:
    loop = asyncio.get_running_loop()
    ran: list[str] = []
    other_ran = asyncio.Event()
    release = threading.Event()

    def other() -> None:
        notify.call_soon_on(loop, ran.append, "other")
        loop.call_soon_threadsafe(other_ran.set)

    def holder() -> None:
        notify.hold_wakeups()
        notify.call_soon_on(loop, ran.append, "held")
        other_thread = threading.Thread(target=other)
        other_thread.start()
        other_thread.join(5)
        assert release.wait(5)
        notify.release_wakeups()

    worker = asyncio.ensure_future(_on_a_thread(holder))
    await asyncio.wait_for(other_ran.wait(), 5)
    assert ran == ["other"]
    release.set()
    await worker
    for _ in range(5):
        await asyncio.sleep(0)
    assert ran == ["other", "held"]

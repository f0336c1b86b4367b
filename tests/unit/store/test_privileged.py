"""Which projects may run privileged containers."""

from __future__ import annotations

from capsa.store import Store


async def test_projects_are_forbidden_until_allowed_and_changes_say_whether_they_changed(
    store: Store,
) -> None:
    assert not await store.privileged.allowed("p1")
    assert await store.privileged.set_allowed("p1", True)
    assert not await store.privileged.set_allowed("p1", True)
    assert await store.privileged.allowed("p1")
    assert not await store.privileged.allowed("p2")
    assert await store.privileged.allowed_projects() == {"p1"}
    assert await store.privileged.set_allowed("p1", False)
    assert not await store.privileged.set_allowed("p1", False)
    assert not await store.privileged.allowed("p1")


async def test_deleting_a_local_project_takes_its_allowance_with_it(store: Store) -> None:
    project = await store.identity.create_project("team")
    await store.privileged.set_allowed(project.id, True)
    await store.identity.delete_project(project.id)
    assert await store.privileged.allowed_projects() == set()

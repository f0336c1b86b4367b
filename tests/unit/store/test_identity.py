"""Projects, users, roles and revocations of the local identity service, in the store."""

from __future__ import annotations

from datetime import timedelta

from capsa.model.clock import utcnow
from capsa.store import Store


async def test_what_is_created_is_what_is_found(store: Store) -> None:
    project = await store.identity.create_project("team", "a team")
    user = await store.identity.create_user("alice", "hash", project.id)
    assert await store.identity.find_project("team") == project
    assert await store.identity.find_project(project.id) == project
    assert await store.identity.find_user("alice") == user
    assert await store.identity.user_with_password(user.id) == (user, "hash")


async def test_a_role_is_given_once_and_taken_once(store: Store) -> None:
    project = await store.identity.create_project("team")
    user = await store.identity.create_user("alice", "hash")
    assert await store.identity.principal(user.id, project.id) is None
    assert await store.identity.add_role(user.id, project.id, "member")
    assert not await store.identity.add_role(user.id, project.id, "member")
    assert await store.identity.add_role(user.id, project.id, "reader")
    principal = await store.identity.principal(user.id, project.id)
    assert principal is not None and principal.roles == {"member", "reader"}
    assert await store.identity.remove_role(user.id, project.id, "reader")
    assert not await store.identity.remove_role(user.id, project.id, "reader")
    principal = await store.identity.principal(user.id, project.id)
    assert principal is not None and principal.roles == {"member"}


async def test_a_revoked_token_stays_revoked_and_only_it(store: Store) -> None:
    project = await store.identity.create_project("team")
    user = await store.identity.create_user("alice", "hash")
    await store.identity.add_role(user.id, project.id, "member")
    expires = utcnow() + timedelta(hours=1)
    await store.identity.revoke("audit-1", expires)
    # Revoking again (a client that retries) changes nothing and fails nothing.
    await store.identity.revoke("audit-1", expires)
    assert await store.identity.principal(user.id, project.id, "audit-1") is None
    assert await store.identity.principal(user.id, project.id, "audit-2") is not None

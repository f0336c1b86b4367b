"""``capsa project|user|role ...``: the local identity service's projects, users and roles, and
which projects may run privileged containers.

These commands are the operator's, on a host of capsa: like ``keystone-manage`` they write
capsa's database directly (``database.url`` of the configuration), so they work before the API is
up and need no token. A change takes effect at once: tokens are checked against these rows on
every request, so disabling a user or deleting a project ends its tokens with the next request.
``capsa project set ID --allow-privileged`` also works with an external Keystone (or noauth),
whose projects capsa does not keep: the project is then named by its id.
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from capsa.cli.errors import CliError, ExitCode
from capsa.cli.output import Output, table, text
from capsa.config import Config
from capsa.identity.admin import IdentityAdmin
from capsa.log import get_logger
from capsa.model.identity import Project, User
from capsa.store import Store
from capsa.store.identity import IdentityConflict

T = TypeVar("T")

log = get_logger(__name__)


def run(cfg: Config, work: Callable[[IdentityAdmin, Store], Awaitable[T]]) -> T:
    if cfg.auth.mode != "local":
        raise CliError(
            f"auth.mode is {cfg.auth.mode!r}: capsa's identity service is off, so it has no "
            "users or projects to manage",
            ExitCode.USAGE,
        )
    return run_on_store(cfg, work)


def run_on_store(cfg: Config, work: Callable[[IdentityAdmin, Store], Awaitable[T]]) -> T:
    async def with_store() -> T:
        store = Store(cfg.database_url)
        await store.open()
        try:
            return await work(IdentityAdmin(store.identity), store)
        finally:
            await store.close()

    try:
        return asyncio.run(with_store())
    except IdentityConflict as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None


async def project_of(admin: IdentityAdmin, ident: str) -> Project:
    project = await admin.store.find_project(ident)
    if project is None:
        raise CliError(f"no project has the name or id {ident!r}")
    return project


async def user_of(admin: IdentityAdmin, ident: str) -> User:
    user = await admin.store.find_user(ident)
    if user is None:
        raise CliError(f"no user has the name or id {ident!r}")
    return user


def read_password(password: str | None, prompt: bool) -> str:
    if password is not None:
        return password
    if not prompt:
        raise CliError("give the password with --password or --password-prompt", ExitCode.USAGE)
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat the password: "):
        raise CliError("the two passwords differ", ExitCode.USAGE)
    return first


def project_command(cfg: Config, out: Output, action: str, args: Any) -> int:
    if action == "set" and args.enabled is None and args.allow_privileged is None:
        raise CliError(
            "say what to change: --enable, --disable, --allow-privileged or --no-allow-privileged",
            ExitCode.USAGE,
        )

    async def work(admin: IdentityAdmin, store: Store) -> int:
        identity = admin.store
        if action == "create":
            project = await identity.create_project(args.name, args.description)
            out.result(
                _project(project, privileged=False), f"project {project.name} created: {project.id}"
            )
        elif action == "list":
            privileged = await store.privileged.allowed_projects()
            projects = [_project(p, p.id in privileged) for p in await identity.projects()]
            rows = [
                [
                    p["id"],
                    p["name"],
                    str(p["enabled"]),
                    str(p["allow_privileged"]),
                    text(p["description"]),
                ]
                for p in projects
            ]
            out.result(
                projects, table(("ID", "NAME", "ENABLED", "PRIVILEGED", "DESCRIPTION"), rows)
            )
        elif action == "set":
            project = await project_of(admin, args.name)
            changes: dict[str, Any] = {"id": project.id}
            said = []
            if args.enabled is not None:
                await identity.set_project_enabled(project.id, args.enabled)
                changes["enabled"] = args.enabled
                said.append("enabled" if args.enabled else "disabled")
            if args.allow_privileged is not None:
                said.append(await _set_privileged(store, project.id, args.allow_privileged))
                changes["allow_privileged"] = args.allow_privileged
            out.result(changes, f"project {project.name} {', '.join(said)}")
        elif action == "delete":
            project = await project_of(admin, args.name)
            await identity.delete_project(project.id)
            out.result({"id": project.id, "deleted": True}, f"project {project.name} deleted")
        return ExitCode.OK

    if action == "set" and cfg.auth.mode != "local" and args.enabled is None:
        return run_on_store(cfg, lambda _admin, store: _set_external(store, out, args))
    return run(cfg, work)


async def _set_privileged(store: Store, project_id: str, allowed: bool) -> str:
    changed = await store.privileged.set_allowed(project_id, allowed)
    if changed:
        log.info(
            "privileged containers allowed" if allowed else "privileged containers forbidden",
            project=project_id,
        )
    state = "allowed privileged containers" if allowed else "forbidden privileged containers"
    return state if changed else f"already {state}"


async def _set_external(store: Store, out: Output, args: Any) -> int:
    """--allow-privileged for a project of an external Keystone (or noauth): capsa keeps no copy
    of those projects, so the id is taken as given."""
    said = await _set_privileged(store, args.name, args.allow_privileged)
    out.result(
        {"id": args.name, "allow_privileged": args.allow_privileged}, f"project {args.name} {said}"
    )
    return ExitCode.OK


def user_command(cfg: Config, out: Output, action: str, args: Any) -> int:
    password = None
    if action == "create" or (action == "set" and (args.password or args.password_prompt)):
        password = read_password(args.password, args.password_prompt)

    async def work(admin: IdentityAdmin, _store: Store) -> int:
        store = admin.store
        if action == "create":
            project = await project_of(admin, args.project) if args.project else None
            if args.role and project is None:
                raise CliError("--role needs --project", ExitCode.USAGE)
            assert password is not None
            user = await admin.create_user(args.name, password, project, args.role)
            out.result(_user(user), f"user {user.name} created: {user.id}")
        elif action == "list":
            users = [_user(u) for u in await store.users()]
            rows = [
                [u["id"], u["name"], str(u["enabled"]), text(u["default_project_id"])]
                for u in users
            ]
            out.result(users, table(("ID", "NAME", "ENABLED", "DEFAULT_PROJECT"), rows))
        elif action == "set":
            user = await user_of(admin, args.name)
            if password is not None:
                await admin.set_password(user, password)
            if args.enabled is not None:
                await store.update_user(user.id, enabled=args.enabled)
            out.result({"id": user.id}, f"user {user.name} updated")
        elif action == "delete":
            user = await user_of(admin, args.name)
            await store.delete_user(user.id)
            out.result({"id": user.id, "deleted": True}, f"user {user.name} deleted")
        return ExitCode.OK

    return run(cfg, work)


def role_command(cfg: Config, out: Output, action: str, args: Any) -> int:
    async def work(admin: IdentityAdmin, _store: Store) -> int:
        if action == "list":
            user = await user_of(admin, args.user) if args.user else None
            project = await project_of(admin, args.project) if args.project else None
            assignments = await admin.store.assignments(
                user.id if user else None, project.id if project else None
            )
            data = [
                {
                    "role": a.role,
                    "user": a.user_name,
                    "user_id": a.user_id,
                    "project": a.project_name,
                    "project_id": a.project_id,
                }
                for a in assignments
            ]
            rows = [[a["role"], a["user"], a["project"]] for a in data]
            out.result(data, table(("ROLE", "USER", "PROJECT"), rows))
            return ExitCode.OK
        if not args.project:
            raise CliError(f"role {action} needs --project", ExitCode.USAGE)
        user = await user_of(admin, args.user)
        project = await project_of(admin, args.project)
        if action == "add":
            changed = await admin.grant(user, project, args.role)
            verb = "given to" if changed else "already held by"
        else:
            changed = await admin.store.remove_role(user.id, project.id, args.role)
            verb = "taken from" if changed else "not held by"
        out.result(
            {"role": args.role, "user_id": user.id, "project_id": project.id, "changed": changed},
            f"role {args.role} in project {project.name} {verb} {user.name}",
        )
        return ExitCode.OK

    return run(cfg, work)


def _project(project: Project, privileged: bool) -> dict[str, Any]:
    return {
        "id": project.id,
        "name": project.name,
        "description": project.description,
        "enabled": project.enabled,
        "allow_privileged": privileged,
    }


def _user(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": user.name,
        "enabled": user.enabled,
        "default_project_id": user.default_project_id,
    }

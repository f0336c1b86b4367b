"""Managing the local identity service: users, projects and roles (the ``capsa`` CLI's ``user``,
``project`` and ``role`` commands), and the bootstrap that ``capsa up`` runs.

The bootstrap makes, when missing, the ``admin`` project and user (role ``admin``) and the ``demo``
project and user (role ``member``). Their passwords are generated once, kept in
``<state_dir>/identity/<user>.password`` (root only) and printed once, when generated. It then
writes a ``clouds.yaml`` with the clouds ``capsa`` (admin) and ``capsa-demo`` (demo) that the
openstack CLI, the SDK and ``capsa`` itself read. Run again, it changes nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from capsa.config import Config
from capsa.files import write_if_changed
from capsa.identity.passwords import hash_password
from capsa.log import get_logger
from capsa.model.identity import (
    ADMIN,
    DEFAULT_DOMAIN_NAME,
    MEMBER,
    REGION,
    ROLES,
    Project,
    User,
)
from capsa.store.identity import IdentityConflict, IdentityStore

log = get_logger(__name__)

ADMIN_CLOUD = "capsa"
DEMO_CLOUD = "capsa-demo"


@dataclass(frozen=True)
class Account:
    cloud: str
    user: str
    project: str
    role: str
    description: str


BOOTSTRAP_ACCOUNTS = (
    Account(ADMIN_CLOUD, "admin", "admin", ADMIN, "capsa's administrators"),
    Account(DEMO_CLOUD, "demo", "demo", MEMBER, "a project to try capsa with"),
)


class IdentityAdmin:
    def __init__(self, store: IdentityStore) -> None:
        self.store = store

    async def create_user(
        self, name: str, password: str, project: Project | None = None, role: str | None = None
    ) -> User:
        """A new user; with ``project`` it is the user's default project, where ``role`` (if
        any) is given."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        user = await self.store.create_user(
            name, await hash_password(password), project.id if project else None
        )
        log.info("user created", user=user.id, name=name)
        if project is not None and role is not None:
            await self.grant(user, project, role)
        return user

    async def set_password(self, user: User, password: str) -> None:
        await self.store.update_user(user.id, password_hash=await hash_password(password))
        log.info("password changed", user=user.id)

    async def grant(self, user: User, project: Project, role: str) -> bool:
        """Gives ``role`` in ``project``; False when the user held it already."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        added = await self.store.add_role(user.id, project.id, role)
        if added:
            log.info("role granted", user=user.id, project=project.id, role=role)
        return added

    async def bootstrap(self, cfg: Config) -> list[str]:
        """Makes what is missing of the admin and demo accounts and writes clouds.yaml; returns
        a line for each password it generated (to print once)."""
        announcements = []
        clouds = {}
        for account in BOOTSTRAP_ACCOUNTS:
            password_file = cfg.identity_dir / f"{account.user}.password"
            password, generated = _password(password_file)
            project = await self._project(account)
            user = await self.store.find_user(account.user)
            if user is None:
                user = await self.create_user(account.user, password, project, account.role)
            elif generated:
                # The database outlived the password file: the new password replaces the old.
                await self.set_password(user, password)
            await self.grant(user, project, account.role)
            if generated:
                announcements.append(
                    f"capsa: user {account.user!r} (project {account.project!r}, role "
                    f"{account.role}) has the password {password} ; it is kept in "
                    f"{password_file} (root only)"
                )
            clouds[account.cloud] = _cloud(cfg, account, password)
        for path in (cfg.identity_dir / "clouds.yaml", *_extra(cfg.auth.clouds_yaml)):
            if _write_clouds(path, clouds):
                log.info("clouds.yaml written", path=str(path), clouds=",".join(clouds))
        return announcements

    async def _project(self, account: Account) -> Project:
        project = await self.store.find_project(account.project)
        if project is None:
            try:
                project = await self.store.create_project(account.project, account.description)
            except IdentityConflict:
                # Another capsa on the same database made it meanwhile.
                project = await self.store.find_project(account.project)
        assert project is not None
        return project


def _password(path: Path) -> tuple[str, bool]:
    """The password kept at ``path``, or a new one written there; True when it is new."""
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    password = secrets.token_urlsafe(18)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_if_changed(path, password + "\n", mode=0o600)
    return password, True


def _cloud(cfg: Config, account: Account, password: str) -> dict[str, Any]:
    return {
        "auth": {
            "auth_url": f"{cfg.api_url}/v3",
            "username": account.user,
            "password": password,
            "project_name": account.project,
            "user_domain_name": DEFAULT_DOMAIN_NAME,
            "project_domain_name": DEFAULT_DOMAIN_NAME,
        },
        "region_name": REGION,
        "interface": "public",
        "identity_api_version": 3,
    }


def _extra(path: str) -> list[Path]:
    return [Path(path)] if path else []


def _write_clouds(path: Path, clouds: dict[str, Any]) -> bool:
    """Puts ``clouds`` into the clouds.yaml at ``path``, keeping the other clouds it lists."""
    try:
        current = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        current = {}
    if not isinstance(current, dict):
        raise ValueError(f"{path} is not a clouds.yaml (its top level is not a mapping)")
    merged = {**current, "clouds": {**(current.get("clouds") or {}), **clouds}}
    return write_if_changed(path, yaml.safe_dump(merged, sort_keys=False), mode=0o600)

"""Who uses capsa: projects, users and the roles a user holds in a project.

capsa has one domain, Keystone's ``default``; names of projects and users are unique in it. The
roles are Keystone's default three: ``admin`` (everything, every project), ``member`` (use the
project) and ``reader`` (look, change nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

DEFAULT_DOMAIN_ID = "default"
DEFAULT_DOMAIN_NAME = "Default"
# capsa's one region: the catalog's endpoints are in it, and clouds.yaml names it (clients pick
# endpoints by region).
REGION = "RegionOne"

ADMIN = "admin"
MEMBER = "member"
READER = "reader"
ROLES = (ADMIN, MEMBER, READER)


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    description: str
    enabled: bool
    created_at: datetime


@dataclass(frozen=True)
class User:
    id: str
    name: str
    enabled: bool
    # The project a token is scoped to when the request names none.
    default_project_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class RoleAssignment:
    user_id: str
    user_name: str
    project_id: str
    project_name: str
    role: str


@dataclass(frozen=True)
class Principal:
    """The caller a valid token stands for: a user acting in one project with some roles."""

    user_id: str
    user_name: str
    project_id: str
    project_name: str
    roles: frozenset[str]

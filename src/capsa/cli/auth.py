"""How ``capsa`` gets a token, the way OpenStack clients do.

Credentials come from, in this order:

1. ``OS_AUTH_URL``, ``OS_USERNAME`` and ``OS_PASSWORD`` (with ``OS_PROJECT_NAME`` or
   ``OS_PROJECT_ID``; ``OS_USER_DOMAIN_NAME``, ``OS_PROJECT_DOMAIN_NAME``), as openrc files do;
2. the cloud named by ``--os-cloud`` or ``OS_CLOUD`` (default ``capsa``, which ``capsa up`` writes)
   in the first clouds.yaml that lists it: ``OS_CLIENT_CONFIG_FILE``, ``./clouds.yaml``,
   ``~/.config/openstack/clouds.yaml``, ``/etc/openstack/clouds.yaml``, then the copy in capsa's
   state dir.

``--project`` scopes the token to another project of the same user. With none of these, requests go
without a token, which only an API in ``noauth`` mode accepts.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capsa.cli.errors import CliError, ExitCode

DEFAULT_CLOUD = "capsa"


@dataclass(frozen=True)
class Credentials:
    auth_url: str
    username: str
    password: str
    project: str | None
    user_domain: str = "Default"
    project_domain: str = "Default"


def clouds_files(environ: Mapping[str, str], state_dir: Path) -> list[Path]:
    files = [Path(environ["OS_CLIENT_CONFIG_FILE"])] if "OS_CLIENT_CONFIG_FILE" in environ else []
    return [
        *files,
        Path("clouds.yaml"),
        Path.home() / ".config" / "openstack" / "clouds.yaml",
        Path("/etc/openstack/clouds.yaml"),
        state_dir / "identity" / "clouds.yaml",
    ]


def find_credentials(
    environ: Mapping[str, str], cloud: str | None, project: str | None, files: list[Path]
) -> Credentials | None:
    credentials = _from_environment(environ) if cloud is None else None
    if credentials is None:
        name = cloud or environ.get("OS_CLOUD")
        credentials = _from_clouds(name or DEFAULT_CLOUD, files, required=name is not None)
    if credentials is not None and project:
        credentials = replace(credentials, project=project)
    return credentials


def login(credentials: Credentials, timeout: float = 30.0) -> str:
    """A token from Keystone's ``POST /v3/auth/tokens`` with the password method."""
    auth: dict[str, Any] = {
        "identity": {
            "methods": ["password"],
            "password": {
                "user": {
                    "name": credentials.username,
                    "domain": {"name": credentials.user_domain},
                    "password": credentials.password,
                }
            },
        }
    }
    if credentials.project:
        auth["scope"] = {
            "project": {"name": credentials.project, "domain": {"name": credentials.project_domain}}
        }
    url = credentials.auth_url.rstrip("/") + "/auth/tokens"
    request = urllib.request.Request(
        url,
        data=json.dumps({"auth": auth}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            token = response.headers.get("X-Subject-Token")
    except urllib.error.HTTPError as exc:
        raise CliError(
            f"{credentials.auth_url} refused to authenticate {credentials.username} "
            f"(HTTP {exc.code}): {_keystone_message(exc.read())}"
        ) from None
    except OSError as exc:
        raise CliError(
            f"cannot reach the identity service at {credentials.auth_url}: {exc}",
            ExitCode.UNREACHABLE,
        ) from None
    if not token:
        raise CliError(f"{credentials.auth_url} answered without a token (X-Subject-Token)")
    return str(token)


# clouds.yaml's auth keys; each is also an OS_<KEY> variable of openrc files.
_AUTH_KEYS = (
    "auth_url",
    "username",
    "password",
    "project_name",
    "project_id",
    "user_domain_name",
    "project_domain_name",
)


def _from_environment(environ: Mapping[str, str]) -> Credentials | None:
    auth = {
        key: environ[f"OS_{key.upper()}"] for key in _AUTH_KEYS if environ.get(f"OS_{key.upper()}")
    }
    if not {"auth_url", "username", "password"} <= set(auth):
        return None
    return _credentials(auth)


def _from_clouds(name: str, files: list[Path], required: bool) -> Credentials | None:
    for path in files:
        try:
            text = path.read_text()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            continue
        import yaml  # only when there is a clouds.yaml: it costs more than the rest of the CLI

        cloud = ((yaml.safe_load(text) or {}).get("clouds") or {}).get(name)
        if cloud is None:
            continue
        try:
            return _credentials(cloud.get("auth") or {})
        except KeyError as exc:
            raise CliError(
                f"cloud {name!r} in {path} has no auth.{exc.args[0]}", ExitCode.USAGE
            ) from None
    if required:
        searched = ", ".join(str(p) for p in files)
        raise CliError(
            f"no clouds.yaml lists the cloud {name!r} (searched {searched})", ExitCode.USAGE
        )
    return None


def _credentials(auth: Mapping[str, str]) -> Credentials:
    """Credentials from clouds.yaml's auth keys; KeyError names a missing one."""
    return Credentials(
        auth_url=auth["auth_url"],
        username=auth["username"],
        password=auth["password"],
        project=auth.get("project_name") or auth.get("project_id"),
        user_domain=auth.get("user_domain_name", "Default"),
        project_domain=auth.get("project_domain_name", "Default"),
    )


def _keystone_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip()[:500]

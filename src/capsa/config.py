"""Every capsa setting, its default, and where it comes from.

Settings are read once, in this order (later wins):

1. the defaults written below;
2. the TOML file named by ``--config`` or ``CAPSA_CONFIG`` (default ``/etc/capsa/capsa.toml``
   when it exists);
3. environment variables: ``CAPSA_<KEY>`` for top-level keys (``CAPSA_STATE_DIR``) and
   ``CAPSA_<SECTION>_<KEY>`` for keys in a section (``CAPSA_API_LISTEN``). Lists are
   comma-separated; booleans accept 1/0, true/false, yes/no, on/off.

Paths that are not set explicitly are derived from ``state_dir``, so that one variable moves a
whole instance (tests run several side by side this way). ``docs/configuration.md`` lists every key.
"""

from __future__ import annotations

import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/capsa/capsa.toml")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and where it came from."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    # "text" (key=value, for people) or "json" (one object per line, for collectors)
    format: str = "text"


WAKEUP_CHANNELS = ("auto", "database", "process")


@dataclass(frozen=True)
class DatabaseConfig:
    # SQLAlchemy URL; empty means SQLite at <state_dir>/capsa.db.
    # PostgreSQL: postgresql+psycopg://user:password@host/capsa (a synchronous driver)
    url: str = ""
    # How a change wakes the reconcilers of the other processes of the database (other hosts):
    # "database" writes its wake-ups there and every process follows them; "process" keeps them
    # within the process (all-in-one), the others see the change at their resync; "auto" is
    # "database" on PostgreSQL and "process" on SQLite. The same on every process.
    wakeups: str = "auto"
    # With "database": how often each process reads the others' wake-ups, in seconds.
    wakeup_poll_interval: float = 0.2


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:9517"
    # Base URL written into links and `next`; empty means http://<listen>.
    public_url: str = ""
    max_body_bytes: int = 1024 * 1024
    max_limit: int = 1000
    # Encoded capsules that list pages keep for reuse while their capsules do not change.
    cached_capsule_bodies: int = 5000
    # Bound on each call to a compute agent (logs); a followed log stream is not bounded.
    agent_timeout: float = 30.0
    # The longest a GET of one capsule or container waits for it to change (``Prefer: wait=N``
    # with ``If-None-Match``); 0 answers at once.
    max_wait: float = 60.0
    # How often waiting GETs look again for changes that other processes wrote (this process's
    # own writes wake them at once).
    wait_recheck_interval: float = 0.5
    # With auth.mode = "noauth" only: the project and user of callers that send no X-Project-Id /
    # X-User-Id.
    default_project_id: str = "default"
    default_user_id: str = "default"


AUTH_MODES = ("local", "keystone", "noauth")


@dataclass(frozen=True)
class AuthConfig:
    # "local": capsa's own identity service (/v3) issues and checks tokens; "keystone": tokens are
    # checked against an external Keystone; "noauth" (UNSAFE, development only): whoever calls is
    # believed, the project and roles come from the X-Project-Id and X-Roles headers.
    mode: str = "local"
    # How long a token issued by the local identity service is valid, in seconds.
    token_ttl: int = 3600
    # The HMAC key that signs tokens; empty means <state_dir>/identity/token.key, made on first use.
    token_key_file: str = ""
    # capsa up makes the admin and demo projects and users when they are missing (local mode).
    bootstrap: bool = True
    # Where capsa up also writes the clouds.yaml of those users (a copy is always in the state
    # dir); empty writes only the state dir's.
    clouds_yaml: str = "/etc/openstack/clouds.yaml"
    # mode = "keystone": the external Keystone's v3 URL and capsa's service user there.
    keystone_url: str = ""
    service_user: str = ""
    service_password: str = ""
    service_project: str = "service"
    service_domain: str = "Default"
    # How long a token the external Keystone confirmed is believed without asking again.
    cache_seconds: float = 10.0


@dataclass(frozen=True)
class PolicyConfig:
    """Who may do what: each rule lists the roles that allow it (any one is enough).

    Every rule applies within the caller's own project; another project's resources are never
    found, whatever the roles, except through the all_projects rules.
    """

    capsule_create: tuple[str, ...] = ("admin", "member")
    capsule_get: tuple[str, ...] = ("admin", "member", "reader")
    capsule_delete: tuple[str, ...] = ("admin", "member")
    # Listing, finding and deleting the capsules of every project.
    capsule_all_projects: tuple[str, ...] = ("admin",)
    # Seeing which host runs a capsule or container.
    capsule_host: tuple[str, ...] = ("admin",)
    # Naming a runtime handler (a Pod's runtimeClassName), an image pull policy, or privileged
    # containers (these only in projects an admin allowed); each also shows the field.
    capsule_runtime: tuple[str, ...] = ("admin", "member")
    capsule_image_pull_policy: tuple[str, ...] = ("admin", "member")
    capsule_privileged: tuple[str, ...] = ("admin", "member")
    container_get: tuple[str, ...] = ("admin", "member", "reader")
    # Single containers (/v1/containers): running them; deleting them (with force: also a
    # running one, admin-only as in Zun); renaming them; start, stop, reboot and kill.
    container_create: tuple[str, ...] = ("admin", "member")
    container_delete: tuple[str, ...] = ("admin", "member")
    container_delete_force: tuple[str, ...] = ("admin",)
    container_update: tuple[str, ...] = ("admin", "member")
    container_action: tuple[str, ...] = ("admin", "member")
    host_get: tuple[str, ...] = ("admin",)
    # Quotas: reading the caller's project's own (and the defaults); reading any project's and
    # the quota classes; setting and resetting them.
    quota_get: tuple[str, ...] = ("admin", "member", "reader")
    quota_all_projects: tuple[str, ...] = ("admin",)
    quota_change: tuple[str, ...] = ("admin",)
    # Private registries: listing and showing the project's; creating, updating and deleting
    # them; reaching every project's (all_projects, by name or uuid).
    registry_get: tuple[str, ...] = ("admin", "member", "reader")
    registry_change: tuple[str, ...] = ("admin", "member")
    registry_all_projects: tuple[str, ...] = ("admin",)
    # The network service: reading, and changing, networks, subnets, ports and security groups.
    network_get: tuple[str, ...] = ("admin", "member", "reader")
    network_change: tuple[str, ...] = ("admin", "member")
    # Seeing and changing every project's network resources, and making them for another project.
    network_all_projects: tuple[str, ...] = ("admin",)
    # Making a network shared with every project.
    network_shared: tuple[str, ...] = ("admin",)
    # Binding a port to a host (binding:host_id) or to a capsule (device_owner compute:capsule).
    network_port_binding: tuple[str, ...] = ("admin",)


@dataclass(frozen=True)
class SchedulerConfig:
    resync_interval: float = 10.0
    # A host whose agent has not reported for this long gets no new capsules.
    host_timeout: float = 60.0


@dataclass(frozen=True)
class AgentConfig:
    # The agent's own HTTP endpoint (logs); the API reaches an agent at the URL it registered.
    listen: str = "127.0.0.1:9518"
    resync_interval: float = 10.0
    # How often running containers are checked for exits (restartPolicy).
    container_poll_interval: float = 1.0
    heartbeat_interval: float = 10.0
    # Schedulable capacity: cores * cpu_allocation_ratio and
    # (RAM - reserved_memory_mb) * memory_allocation_ratio.
    cpu_allocation_ratio: float = 16.0
    memory_allocation_ratio: float = 1.0
    reserved_memory_mb: int = 512
    # CRI runtime handlers this host offers; the first is the default for capsules that name none.
    runtimes: tuple[str, ...] = ("runc",)
    # cgroup parent of every pod sandbox (cgroupfs driver).
    cgroup_parent: str = "/capsa"
    cri_timeout: float = 30.0
    image_pull_timeout: float = 300.0
    # Seconds a container gets between SIGTERM and SIGKILL when its capsule is deleted.
    stop_grace_period: int = 10
    # A container that keeps exiting is restarted after base, 2*base, 4*base... up to max seconds.
    restart_backoff_base: float = 1.0
    restart_backoff_max: float = 60.0
    # Most sandboxes started or stopped at once (the runtime's heaviest calls); capsules waiting
    # for an image, an init container or a back-off hold no slot.
    max_parallel: int = 16


@dataclass(frozen=True)
class CapsuleConfig:
    # Requests of a container that states none: they are claimed on the host and become its limits.
    default_cpu: float = 0.1
    default_memory_mb: int = 64
    max_containers: int = 32


@dataclass(frozen=True)
class QuotaConfig:
    # Zun's defaults for every project; -1 is unlimited. The "default" quota class, which admins
    # set through the API, overrides them; a project's own quota overrides both.
    containers: int = 40
    cpu: int = 20
    memory: int = 51200
    disk: int = 100


@dataclass(frozen=True)
class ContainerdConfig:
    # An existing CRI socket to use instead of starting capsa's own containerd.
    socket: str = ""
    binary: str = "containerd"
    start_timeout: float = 30.0
    # The pause image of every sandbox; empty means capsa's own, from its local registry.
    sandbox_image: str = ""


@dataclass(frozen=True)
class RegistryConfig:
    # Run capsa's local OCI registry and use it as the mirror of the hosts below.
    enabled: bool = True
    listen: str = "127.0.0.1:5000"
    binary: str = "docker-registry"
    mirror_of: tuple[str, ...] = ("docker.io",)
    start_timeout: float = 15.0


@dataclass(frozen=True)
class CredentialsConfig:
    # The key that encrypts private registries' passwords in the database; empty means
    # <state_dir>/credentials.key, made on first use. Every host that runs an API or an agent of
    # one database needs the same file.
    key_file: str = ""


@dataclass(frozen=True)
class ImagesConfig:
    # Built OCI layouts are kept here and reused across state dirs; empty means <state_dir>/images.
    cache_dir: str = ""


@dataclass(frozen=True)
class NetworkConfig:
    # The pool that each project's default network takes its subnet from.
    default_cidr: str = "10.217.0.0/16"
    # Prefix length of a project's default subnet (the whole pool when that is no larger).
    default_prefixlen: int = 24
    mtu: int = 1500
    # This host's address for the VXLAN overlay between hosts; empty: no overlay.
    tunnel_ip: str = ""
    vxlan_port: int = 4789


@dataclass(frozen=True)
class CniConfig:
    # Where the CNI daemon listens: "unix:/path/to.sock" or "HOST:PORT" on loopback. Empty means
    # unix:<state_dir>/run/cni-daemon.sock, which only root can reach (the daemon rewires pods).
    daemon_listen: str = ""
    # Name of the network in the conflist that containerd reads.
    network_name: str = "capsa"
    # capsa-cni gives up on the daemon after this many seconds.
    plugin_timeout: float = 60.0
    # A network's bridge on this host is removed this many seconds after its last pod left, if
    # no pod came meanwhile (0: at once): a capsule that replaces the last one neither waits for
    # the bridge's removal nor makes it again.
    bridge_linger: float = 60.0


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path("/var/lib/capsa")
    # This host's name in the database; empty means the machine's hostname.
    host_name: str = ""
    log: LogConfig = field(default_factory=LogConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    capsule: CapsuleConfig = field(default_factory=CapsuleConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cni: CniConfig = field(default_factory=CniConfig)

    # Derived values: one place that knows where everything lives under state_dir.

    @property
    def resolved_host_name(self) -> str:
        return self.host_name or socket.gethostname()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.state_dir / 'capsa.db'}"

    @property
    def wakeup_poll_interval(self) -> float | None:
        """How often this process reads other processes' wake-ups from the database; None when
        wake-ups stay within the process (``database.wakeups``)."""
        channel = self.database.wakeups
        if channel == "auto":
            channel = "process" if self.database_url.startswith("sqlite") else "database"
        return self.database.wakeup_poll_interval if channel == "database" else None

    @property
    def api_url(self) -> str:
        return (self.api.public_url or f"http://{self.api.listen}").rstrip("/")

    @property
    def identity_dir(self) -> Path:
        """The token signing key, the bootstrap passwords and clouds.yaml: root only."""
        return self.state_dir / "identity"

    @property
    def token_key_path(self) -> Path:
        if self.auth.token_key_file:
            return Path(self.auth.token_key_file)
        return self.identity_dir / "token.key"

    @property
    def agent_url(self) -> str:
        return f"http://{self.agent.listen}"

    @property
    def containerd_dir(self) -> Path:
        return self.state_dir / "containerd"

    @property
    def cri_socket(self) -> str:
        """The CRI endpoint the agent uses: an operator's socket, or capsa's own containerd."""
        return self.containerd.socket or str(self.containerd_dir / "containerd.sock")

    @property
    def manages_containerd(self) -> bool:
        return not self.containerd.socket

    @property
    def cni_daemon_address(self) -> str:
        return self.cni.daemon_listen or f"unix:{self.run_dir / 'cni-daemon.sock'}"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state_dir / "cni" / "net.d"

    @property
    def cni_bin_dir(self) -> Path:
        return self.state_dir / "cni" / "bin"

    @property
    def pod_log_dir(self) -> Path:
        return self.state_dir / "pods"

    @property
    def registry_dir(self) -> Path:
        return self.state_dir / "registry"

    @property
    def credentials_key_path(self) -> Path:
        return (
            Path(self.credentials.key_file)
            if self.credentials.key_file
            else self.state_dir / "credentials.key"
        )

    @property
    def image_cache_dir(self) -> Path:
        return Path(self.images.cache_dir) if self.images.cache_dir else self.state_dir / "images"

    @property
    def run_dir(self) -> Path:
        """Pid files of the processes capsa runs for itself."""
        return self.state_dir / "run"


def load_config(
    path: str | os.PathLike[str] | None = None, environ: typing.Mapping[str, str] | None = None
) -> Config:
    """Defaults, then the TOML file, then ``CAPSA_*`` variables."""
    env = os.environ if environ is None else environ
    config = Config()
    file_path = Path(path) if path else Path(env.get("CAPSA_CONFIG", DEFAULT_CONFIG_FILE))
    if path or "CAPSA_CONFIG" in env or file_path.exists():
        try:
            with file_path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {file_path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file_path} is not valid TOML: {exc}") from exc
        config = _apply_mapping(config, data, str(file_path), prefix="")
    return _checked(_apply_env(config, env))


def _checked(config: Config) -> Config:
    """Refuses settings that are each well typed but cannot be used as they are."""
    database = config.database
    if database.wakeups not in WAKEUP_CHANNELS:
        raise ConfigError(
            f"database.wakeups={database.wakeups!r}: use one of {', '.join(WAKEUP_CHANNELS)}"
        )
    if database.wakeup_poll_interval <= 0:
        raise ConfigError(
            f"database.wakeup_poll_interval={database.wakeup_poll_interval!r}: must be positive"
        )
    if config.api.max_wait < 0:
        raise ConfigError(f"api.max_wait={config.api.max_wait!r}: must be 0 or more")
    if config.api.wait_recheck_interval <= 0:
        raise ConfigError(
            f"api.wait_recheck_interval={config.api.wait_recheck_interval!r}: must be positive"
        )
    if config.cni.bridge_linger < 0:
        raise ConfigError(f"cni.bridge_linger={config.cni.bridge_linger!r}: must be 0 or more")
    auth = config.auth
    if auth.mode not in AUTH_MODES:
        raise ConfigError(f"auth.mode={auth.mode!r}: use one of {', '.join(AUTH_MODES)}")
    if auth.mode == "keystone" and not (
        auth.keystone_url and auth.service_user and auth.service_password
    ):
        raise ConfigError(
            "auth.mode='keystone' needs auth.keystone_url, auth.service_user and "
            "auth.service_password (CAPSA_AUTH_KEYSTONE_URL, ...)"
        )
    return config


def _apply_mapping(obj: Any, data: dict[str, Any], origin: str, prefix: str) -> Any:
    """A copy of the dataclass ``obj`` with the values of ``data``, checked and converted."""
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{origin}: unknown setting {name!r}")
        current = getattr(obj, key)
        if _is_section(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {name!r} must be a table")
            changes[key] = _apply_mapping(current, value, origin, prefix=f"{name}.")
        else:
            changes[key] = _coerce(value, hints[key], name, origin)
    return replace(obj, **changes)


def _apply_env(config: Config, env: typing.Mapping[str, str]) -> Config:
    hints = typing.get_type_hints(Config)
    top: dict[str, Any] = {}
    for f in fields(config):
        current = getattr(config, f.name)
        if _is_section(current):
            section_hints = typing.get_type_hints(type(current))
            section: dict[str, Any] = {}
            for sf in fields(current):
                var = f"CAPSA_{f.name}_{sf.name}".upper()
                if var in env:
                    section[sf.name] = _coerce(env[var], section_hints[sf.name], var, "environment")
            if section:
                top[f.name] = replace(current, **section)
        else:
            var = f"CAPSA_{f.name}".upper()
            if var in env:
                top[f.name] = _coerce(env[var], hints[f.name], var, "environment")
    return replace(config, **top)


def _is_section(value: Any) -> bool:
    """A table of settings (a dataclass instance) rather than a single setting."""
    return is_dataclass(value) and not isinstance(value, type)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, hint: Any, name: str, origin: str) -> Any:
    """Turns a TOML value or an environment string into the setting's type."""
    try:
        if hint is Path:
            return Path(value)
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected a boolean")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        origin_type = typing.get_origin(hint)
        if origin_type is tuple or isinstance(hint, types.GenericAlias):
            items = value
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError("expected a list of strings")
            return tuple(items)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {name}={value!r}: {exc}") from exc
    raise ConfigError(f"{origin}: {name}: unsupported setting type {hint!r}")

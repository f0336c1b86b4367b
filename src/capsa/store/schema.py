"""capsa's tables. Nothing outside the store package writes SQL against them.

Resources are measured in integers (cpu in millicores, memory in MiB) so that claims add up exactly.
What a tenant asked for and never changes (a container's spec, a capsule's labels) is one JSON
document; what is observed and updated (status, ids on the runtime) has columns of its own, so that
reading a page of capsules decodes one document per row, not one per field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# Bump whenever a table changes (with a migration in store/db.py once capsa has users).
SCHEMA_VERSION = 8


class Timestamp(TypeDecorator[datetime]):
    """Naive UTC datetimes; on SQLite stored as ISO 8601 text and read back with the C parser
    (SQLAlchemy's own SQLite DateTime parses with a regular expression, per value)."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name == "sqlite":
            return value.isoformat(sep=" ")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if isinstance(value, str):
            return datetime.fromisoformat(value)
        return value  # type: ignore[no-any-return]

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        # A page of capsules reads thousands of timestamps: on SQLite, straight to the C parser
        # rather than through TypeDecorator's layers of calls.
        if dialect.name == "sqlite":
            return _from_iso
        return super().result_processor(dialect, coltype)


def _from_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


metadata = MetaData()

UUID = String(36)

meta = Table(
    "capsa_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
)

hosts = Table(
    "hosts",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("uuid", UUID, nullable=False, unique=True),
    Column("agent_url", String(255), nullable=False),
    Column("cpu_millis", Integer, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("cpu_millis_used", Integer, nullable=False, default=0),
    Column("memory_mb_used", Integer, nullable=False, default=0),
    Column("runtimes", JSON, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("heartbeat_at", Timestamp),
    # The host's address on the underlay that carries the networks' VXLAN overlay; None: no overlay.
    Column("tunnel_ip", String(64)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

capsules = Table(
    "capsules",
    metadata,
    Column("uuid", UUID, primary_key=True),
    # "capsule" (/v1/capsules) or "container" (a single container of /v1/containers).
    Column("kind", String(16), nullable=False, default="capsule"),
    Column("name", String(255), nullable=False),
    Column("project_id", String(255), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("desired_state", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("status_reason", Text),
    Column("task_state", String(32)),
    Column("restart_policy", String(16), nullable=False),
    Column("runtime", String(64)),
    # {"labels": {...}, "annotations": {...}}, and a single container's "hostname",
    # "max_retries" and "auto_remove"
    Column("metadata", JSON, nullable=False),
    # What the capsule claims on its host; released in the same transaction that removes it.
    Column("cpu_millis", Integer, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("host", String(255), index=True),
    Column("sandbox_id", String(128)),
    # What a single container's actions ask of the agent: each start and reboot raises the
    # generation; a stop or reboot's timeout; a signal to send (kill) until it is sent.
    Column("generation", Integer, nullable=False, default=0),
    Column("stop_timeout", Integer),
    Column("pending_signal", String(16)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # A capsule and a container may share a name; two capsules (or containers) of a project not.
    UniqueConstraint("project_id", "kind", "name", name="uq_capsules_project_name"),
)
Index("ix_capsules_project_created", capsules.c.project_id, capsules.c.kind, capsules.c.created_at)

containers = Table(
    "containers",
    metadata,
    Column("uuid", UUID, primary_key=True),
    Column(
        "capsule_uuid",
        UUID,
        ForeignKey("capsules.uuid", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("project_id", String(255), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("position", Integer, nullable=False),
    Column("name", String(255), nullable=False),
    # The ContainerSpec but its name: image, command, args, env, resources, ports...
    Column("spec", JSON, nullable=False),
    Column("status", String(32), nullable=False),
    Column("status_reason", Text),
    Column("task_state", String(32)),
    Column("cri_container_id", String(128)),
    Column("restart_count", Integer, nullable=False, default=0),
    Column("exit_code", Integer),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    UniqueConstraint("capsule_uuid", "name", name="uq_containers_capsule_name"),
)

networks = Table(
    "networks",
    metadata,
    Column("id", UUID, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("description", String(255), nullable=False, default=""),
    Column("project_id", String(255), nullable=False, index=True),
    Column("shared", Boolean, nullable=False),
    Column("admin_state_up", Boolean, nullable=False, default=True),
    # The project whose default network this is (unique: one default per project, race-free).
    Column("default_for", String(255), unique=True),
    Column("mtu", Integer, nullable=False),
    # The VNI of the network's VXLAN segment between hosts.
    Column("segmentation_id", Integer, nullable=False, unique=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

subnets = Table(
    "subnets",
    metadata,
    Column("id", UUID, primary_key=True),
    Column("network_id", UUID, ForeignKey("networks.id", ondelete="CASCADE"), nullable=False),
    Column("project_id", String(255), nullable=False),
    Column("name", String(255), nullable=False, default=""),
    Column("description", String(255), nullable=False, default=""),
    Column("cidr", String(64), nullable=False),
    Column("gateway_ip", String(64), nullable=False),
    # [[start, end], ...]; empty: every host address but the gateway.
    Column("allocation_pools", JSON, nullable=False),
    Column("dns_nameservers", JSON, nullable=False),
    Column("enable_dhcp", Boolean, nullable=False, default=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

ports = Table(
    "ports",
    metadata,
    Column("id", UUID, primary_key=True),
    Column("network_id", UUID, ForeignKey("networks.id"), nullable=False),
    Column("subnet_id", UUID, ForeignKey("subnets.id"), nullable=False),
    Column("project_id", String(255), nullable=False),
    Column("name", String(255), nullable=False, default=""),
    Column("description", String(255), nullable=False, default=""),
    Column("admin_state_up", Boolean, nullable=False, default=True),
    Column("ip_address", String(64), nullable=False),
    Column("mac_address", String(17), nullable=False, unique=True),
    Column("device_id", String(255), nullable=False, index=True),
    Column("device_owner", String(64), nullable=False),
    # The port's place among its capsule's ports: 0 is the pod's first interface (CNI_IFNAME,
    # with the default route), 1 the next (eth1)...; 0 for a port made through the API.
    Column("interface_index", Integer, nullable=False, default=0),
    Column("status", String(16), nullable=False),
    Column("host", String(255), index=True),
    Column("binding_container_id", String(128)),
    Column("binding_host_ifname", String(16)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # The database, not a lock, makes concurrent allocations on one subnet distinct.
    UniqueConstraint("subnet_id", "ip_address", name="uq_ports_subnet_ip"),
)

security_groups = Table(
    "security_groups",
    metadata,
    Column("id", UUID, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("description", String(255), nullable=False, default=""),
    Column("project_id", String(255), nullable=False, index=True),
    # The project whose default group this is (unique: one per project, race-free).
    Column("default_for", String(255), unique=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

security_group_rules = Table(
    "security_group_rules",
    metadata,
    Column("id", UUID, primary_key=True),
    Column(
        "security_group_id",
        UUID,
        ForeignKey("security_groups.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("project_id", String(255), nullable=False),
    Column("description", String(255), nullable=False, default=""),
    Column("direction", String(8), nullable=False),
    Column("ethertype", String(4), nullable=False),
    Column("protocol", String(16)),
    Column("port_range_min", Integer),
    Column("port_range_max", Integer),
    Column("remote_ip_prefix", String(64)),
    Column("remote_group_id", UUID, ForeignKey("security_groups.id", ondelete="CASCADE")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

# Which security groups a port is in. A group that ports are in cannot be deleted.
port_security_groups = Table(
    "port_security_groups",
    metadata,
    Column("port_id", UUID, ForeignKey("ports.id", ondelete="CASCADE"), primary_key=True),
    Column("security_group_id", UUID, ForeignKey("security_groups.id"), primary_key=True),
    Index("ix_port_security_groups_group", "security_group_id"),
)

# A project's own limits, one row per resource it overrides (Zun's quotas table).
quotas = Table(
    "quotas",
    metadata,
    Column("project_id", String(255), primary_key=True),
    Column("resource", String(32), primary_key=True),
    Column("hard_limit", Integer, nullable=False),
)

# Limits of a quota class per resource; the "default" class backs every project's limits.
quota_classes = Table(
    "quota_classes",
    metadata,
    Column("class_name", String(255), primary_key=True),
    Column("resource", String(32), primary_key=True),
    Column("hard_limit", Integer, nullable=False),
)

# One row per project that has created something: the row a create locks (SELECT ... FOR
# UPDATE) on databases whose write transactions run side by side, so that the quota check and the
# insert of one create cannot interleave with another's. SQLite's BEGIN IMMEDIATE already does it.
quota_locks = Table(
    "quota_locks",
    metadata,
    Column("project_id", String(255), primary_key=True),
)

# Private registries (Zun's /v1/registries); the password only as capsa.secrets encrypted it.
registries = Table(
    "registries",
    metadata,
    Column("uuid", UUID, primary_key=True),
    Column("project_id", String(255), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("name", String(255)),
    Column("domain", String(255), nullable=False),
    Column("username", String(255)),
    Column("password_token", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # Names are optional; those given are unique in a project, so that templates can use them.
    UniqueConstraint("project_id", "name", name="uq_registries_project_name"),
)
Index("ix_registries_project_created", registries.c.project_id, registries.c.created_at)
# Projects whose capsules may run privileged containers, as an admin allowed (any auth.mode:
# the id is the token's project id, local or Keystone's).
privileged_projects = Table(
    "privileged_projects",
    metadata,
    Column("project_id", String(255), primary_key=True),
    Column("created_at", Timestamp, nullable=False),
)

# Identity (the local identity service; with an external Keystone these stay empty).

projects = Table(
    "projects",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("description", Text, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    # argon2id, with its parameters and salt; never leaves the identity service.
    Column("password_hash", String(255), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("default_project_id", String(64), ForeignKey("projects.id", ondelete="SET NULL")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

role_assignments = Table(
    "role_assignments",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column(
        "project_id", String(64), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("role", String(64), primary_key=True),
    Index("ix_role_assignments_project", "project_id"),
)

# Wake-ups for the other processes of the database (capsa.store.wakefeed): one row per wake-up,
# written by the transaction of its change, read in order of seq and deleted after a while.
wakeups = Table(
    "wakeups",
    metadata,
    # Never reused (AUTOINCREMENT on SQLite), even once every row is pruned: followers compare it.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(300), nullable=False),
    Column("subject", String(255)),
    # The process that made the change, and woke its own reconcilers already.
    Column("origin", String(32), nullable=False),
    Column("created_at", Timestamp, nullable=False, index=True),
    sqlite_autoincrement=True,
)

# Tokens revoked before they expire; a row can go once its token has expired anyway.
revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("audit_id", String(64), primary_key=True),
    Column("expires_at", Timestamp, nullable=False, index=True),
)

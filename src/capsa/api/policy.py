"""Who may do what: one place for the rules of every API (Zun's /v1 and the network service).

Each rule (a field of :class:`capsa.config.PolicyConfig`) lists the roles that allow it; any one of
them is enough. The defaults follow Keystone's three roles: ``reader`` looks, ``member`` also
changes its project's resources, ``admin`` also reaches every project and sees hosts. An operator
overrides a rule in the config file (``[policy] capsule_runtime = ["admin"]``).

Rules say what a caller may do within its own project: another project's resources are never
found (404, not 403) unless a rule about every project allows it. Handlers ask through the
request's context: ``context.authorize("capsule_create")`` raises Zun's 403 with the rule's name,
``context.can("capsule_host")`` only answers.
"""

from __future__ import annotations

from dataclasses import fields

from capsa.config import PolicyConfig


class Policy:
    def __init__(self, config: PolicyConfig) -> None:
        self._rules = {f.name: frozenset(getattr(config, f.name)) for f in fields(config)}

    def allows(self, rule: str, roles: frozenset[str]) -> bool:
        """Whether ``roles`` allow ``rule``; an unknown rule is a bug (KeyError), never allowed."""
        return not roles.isdisjoint(self._rules[rule])

    def roles_for(self, rule: str) -> frozenset[str]:
        return self._rules[rule]


def rule_name(rule: str) -> str:
    """Zun's spelling of a rule in messages: ``capsule:create`` for ``capsule_create``."""
    return rule.replace("_", ":", 1)

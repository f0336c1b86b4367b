"""Signed tokens: who, in which project, from when until when, checked without a database read.

A token is ``capsa1.<payload>.<mac>``: the payload (base64url JSON) names the user, the project,
the issue and expiry times and an audit id; the mac is HMAC-SHA256 of the payload under a key that
only capsa reads. A forged or altered token fails the mac; an expired one fails its time. Whether
its user, project and roles still hold is checked against the store on each use (see
:meth:`capsa.store.identity.IdentityStore.principal`), so nothing about them is trusted from the
token itself but their ids.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from capsa.files import create_key_file
from capsa.model.clock import utcnow

_PREFIX = "capsa1"
_KEY_BYTES = 32


@dataclass(frozen=True)
class TokenClaims:
    user_id: str
    project_id: str
    issued_at: datetime
    expires_at: datetime
    # Names this token (and only it) for revocation; Keystone's audit_ids.
    audit_id: str


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def issue(self, user_id: str, project_id: str, ttl: timedelta) -> tuple[str, TokenClaims]:
        now = utcnow().replace(microsecond=0)
        claims = TokenClaims(
            user_id=user_id,
            project_id=project_id,
            issued_at=now,
            expires_at=now + ttl,
            audit_id=_b64(secrets.token_bytes(16)),
        )
        payload = _b64(
            orjson.dumps(
                [
                    user_id,
                    project_id,
                    _epoch(claims.issued_at),
                    _epoch(claims.expires_at),
                    claims.audit_id,
                ]
            )
        )
        return f"{_PREFIX}.{payload}.{self._mac(payload)}", claims

    def verify(self, token: str) -> TokenClaims | None:
        """The claims of a token this key signed and that has not expired, else None."""
        prefix, _, rest = token.partition(".")
        payload, _, mac = rest.partition(".")
        if prefix != _PREFIX or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            user_id, project_id, issued, expires, audit_id = orjson.loads(_unb64(payload))
        except (ValueError, TypeError, binascii.Error):
            return None
        claims = TokenClaims(user_id, project_id, _naive(issued), _naive(expires), audit_id)
        return claims if claims.expires_at > utcnow() else None

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def load_or_create_key(path: Path) -> bytes:
    """The signing key at ``path``, made (random, readable by root only) if there is none."""
    create_key_file(path, secrets.token_bytes(_KEY_BYTES))
    key = path.read_bytes()
    if len(key) < _KEY_BYTES:
        raise ValueError(f"the token key {path} is shorter than {_KEY_BYTES} bytes")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _epoch(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp())


def _naive(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)

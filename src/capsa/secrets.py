"""Secrets that capsa keeps in its database, encrypted at rest: private registries' passwords.

A secret is encrypted with Fernet (AES-128-CBC and HMAC-SHA256, from ``cryptography``) under one
key per deployment, kept in a file that only root can read (``credentials.key_file``). The API
encrypts what tenants send; the agent that pulls an image decrypts it just before the pull; the
database, its backups and its logs only ever hold the token. The key is made on first use; a key
that another process made at the same moment wins, so every process of a host uses one key.
"""

from __future__ import annotations

import base64
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.fernet import Fernet


class SecretKeyMismatch(Exception):
    """A secret was encrypted under another key than this host's."""


class SecretBox:
    def __init__(self, key: bytes, path: Path | None = None) -> None:
        try:
            valid = len(base64.urlsafe_b64decode(key)) == 32
        except ValueError:
            valid = False
        if not valid:
            where = f" in {path}" if path else ""
            raise ValueError(f"the secrets key{where} is not a Fernet key (32 bytes in base64)")
        self._key = key
        self.path = path

    @cached_property
    def _fernet(self) -> Fernet:
        # cryptography costs 7 MB of memory: a capsa whose tenants keep no secrets never loads it.
        from cryptography.fernet import Fernet

        return Fernet(self._key)

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        """The key in ``path``, made (mode 0600, in a 0700 directory) when there is none."""
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            candidate = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                # A Fernet key: 32 random bytes, URL-safe base64.
                f.write(base64.urlsafe_b64encode(os.urandom(32)))
                f.flush()
                os.fsync(f.fileno())
            try:
                # A link fails if the key exists: a key another process made first is kept.
                os.link(candidate, path)
            except FileExistsError:
                pass
            finally:
                candidate.unlink()
        return cls(path.read_bytes().strip(), path)

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, token: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            where = f" ({self.path})" if self.path else ""
            raise SecretKeyMismatch(
                f"a secret in the database was encrypted under another key than this host's"
                f"{where}: every API and agent of one database needs the same "
                "credentials.key_file"
            ) from None

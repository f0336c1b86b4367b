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

from capsa.files import create_key_file

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
        # A Fernet key: 32 random bytes, URL-safe base64.
        create_key_file(path, base64.urlsafe_b64encode(os.urandom(32)))
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

"""Password hashes: argon2id with its parameters and salt in the hash (PHC string format).

Hashing costs a few hundred milliseconds of CPU by design, so it runs on a thread, never on the
event loop. A password is never logged and never leaves this module except as its hash.
"""

from __future__ import annotations

import asyncio
import functools

import argon2

# argon2-cffi's defaults: RFC 9106's low-memory profile (t=3, m=64 MiB, p=4).
HASHER = argon2.PasswordHasher()


@functools.cache
def _absent_user_hash() -> str:
    """Verified when a user does not exist, so that such a request takes as long as a wrong
    password; made on first need, not at import."""
    return HASHER.hash("no such user")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(HASHER.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; None stands for an unknown user."""
    try:
        return await asyncio.to_thread(
            HASHER.verify, password_hash or _absent_user_hash(), password
        )
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False

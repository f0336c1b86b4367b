from __future__ import annotations

from pathlib import Path

import pytest

from capsa.secrets import SecretBox, SecretKeyMismatch


def test_a_key_is_made_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "credentials.key"
    box = SecretBox.load_or_create(path)
    # Long enough that base64 cannot hold it by chance (a two-letter one did, now and then).
    secret = "correct-horse-battery-staple"
    token = box.encrypt(secret)
    assert secret not in token
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert SecretBox.load_or_create(path).decrypt(token) == secret
    assert [p.name for p in path.parent.iterdir()] == ["credentials.key"]


def test_a_token_of_another_key_names_the_setting(tmp_path: Path) -> None:
    token = SecretBox.load_or_create(tmp_path / "a.key").encrypt("pw")
    with pytest.raises(SecretKeyMismatch, match=r"b\.key.*credentials\.key_file"):
        SecretBox.load_or_create(tmp_path / "b.key").decrypt(token)


def test_a_key_file_that_holds_no_key_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "credentials.key"
    path.write_text("not a key\n")
    with pytest.raises(ValueError, match=r"credentials.key is not a Fernet key"):
        SecretBox.load_or_create(path)


def test_a_made_key_encrypts_and_decrypts(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path / "credentials.key")
    token = box.encrypt("s3cret")
    assert "s3cret" not in token
    assert SecretBox.load_or_create(tmp_path / "credentials.key").decrypt(token) == "s3cret"

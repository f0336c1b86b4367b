from __future__ import annotations

from pathlib import Path

from capsa.files import create_key_file, write_if_changed


def test_a_file_is_written_only_when_its_content_or_mode_changes(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "conf"
    assert write_if_changed(path, "a\n")
    inode = path.stat().st_ino
    assert not write_if_changed(path, "a\n")
    assert path.stat().st_ino == inode, "an unchanged file was replaced"

    assert write_if_changed(path, "a\n", mode=0o755)
    assert path.stat().st_mode & 0o7777 == 0o755
    assert write_if_changed(path, b"b\n", mode=0o755)
    assert path.read_text() == "b\n"
    # Replaced by rename, so nothing but the file is left beside it.
    assert [p.name for p in path.parent.iterdir()] == ["conf"]


def test_a_key_file_is_made_private_once_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "a.key"
    create_key_file(path, b"first")
    assert path.read_bytes() == b"first"
    assert path.stat().st_mode & 0o7777 == 0o600
    assert path.parent.stat().st_mode & 0o7777 == 0o700
    # Another process's key, made later, never replaces the one in use.
    create_key_file(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in path.parent.iterdir()] == ["a.key"]

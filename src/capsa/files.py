"""Files that capsa writes for other programs (configs, pid files, the CNI plugin): replaced
atomically, so that a reader (containerd may read or exec them at any moment) or a crash never
sees half a file, and rewritten only when their content or mode changes. Key files are written
once and never replaced (:func:`create_key_file`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _written_beside(path, data)
    try:
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, content: str | bytes, mode: int = 0o644) -> bool:
    """Writes ``content`` unless the file already holds it with ``mode``; True when it wrote."""
    data = content.encode() if isinstance(content, str) else content
    try:
        if path.read_bytes() == data and path.stat().st_mode & 0o7777 == mode:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, mode)
    return True


def create_key_file(path: Path, key: bytes) -> None:
    """Writes ``key`` to ``path`` (mode 0600, in a directory made 0700 if missing) unless the file
    exists. Of processes that make it at the same moment, the first one's key stays: a link,
    unlike a rename, never replaces, so every process ends up reading the same key."""
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _written_beside(path, key)  # 0600, as mkstemp makes it
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _written_beside(path: Path, data: bytes) -> Path:
    """A new file (mode 0600) in ``path``'s directory holding ``data``, on disk."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)

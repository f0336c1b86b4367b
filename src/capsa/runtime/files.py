"""Small file helpers shared by the runtime pieces: config and pid files are replaced atomically,
so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    tmp.replace(path)


def write_if_changed(path: Path, content: str) -> bool:
    """Writes ``content`` unless the file already holds it; True when it wrote."""
    try:
        if path.read_text() == content:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, content)
    return True

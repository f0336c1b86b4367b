"""The stranded task is deleted through containerd's client, ctr: here a stand-in that records."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa.runtime.tasks import StrandedTaskError, free_stranded_task


def stand_in(tmp_path: Path, stderr: str = "", code: int = 0) -> tuple[str, Path]:
    """A ctr that writes its arguments to a file, then says ``stderr`` and exits ``code``."""
    args = tmp_path / "args"
    ctr = tmp_path / "ctr"
    ctr.write_text(f'#!/bin/sh\necho "$@" > {args}\necho "{stderr}" >&2\nexit {code}\n')
    ctr.chmod(0o755)
    return str(ctr), args


async def test_the_task_is_killed_and_deleted_in_the_cri_namespace(tmp_path: Path) -> None:
    ctr, args = stand_in(tmp_path)

    await free_stranded_task("unix:///x/containerd.sock", "c1", 5, ctr=ctr)

    assert args.read_text().split() == [
        "--address", "/x/containerd.sock", "--namespace", "k8s.io",
        "tasks", "delete", "--force", "c1",
    ]  # fmt: skip


async def test_a_task_already_gone_is_no_error(tmp_path: Path) -> None:
    ctr, _ = stand_in(tmp_path, 'ctr: task "c1" not found: not found', 1)

    await free_stranded_task("/x/containerd.sock", "c1", 5, ctr=ctr)


async def test_a_task_that_cannot_be_deleted_says_why(tmp_path: Path) -> None:
    ctr, _ = stand_in(tmp_path, "ctr: connection refused", 1)

    with pytest.raises(StrandedTaskError, match=r"container c1: .*connection refused"):
        await free_stranded_task("/x/containerd.sock", "c1", 5, ctr=ctr)

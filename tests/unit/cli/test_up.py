"""What ``capsa up`` sets for its own process before it starts anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Eight threads allocate from glibc's malloc at once (ctypes buffers past pymalloc's 512 bytes),
# then malloc_info counts the arenas they used.
_COUNT_ARENAS = """
import ctypes, os, sys, tempfile, threading
if sys.argv[1] == "capsa":
    from capsa.cli.up import _one_malloc_arena
    _one_malloc_arena()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
start = threading.Barrier(8)
kept = []
def allocate():
    start.wait()
    for _ in range(2000):
        kept.append(ctypes.create_string_buffer(4096))
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
fd, path = tempfile.mkstemp()
os.close(fd)
info = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, info)
libc.fclose(info)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def _arenas(setting: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_ARENAS, setting],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_capsa_up_keeps_every_thread_in_mallocs_main_arena() -> None:
    # Without the setting, threads that meet in malloc get arenas of their own.
    assert _arenas("default") > 1
    assert _arenas("capsa") == 1

"""Puts capsa-cni where containerd looks: the launcher in the CNI bin dir, the conflist in net.d.

containerd 1.6 also runs the reference ``loopback`` plugin for every sandbox, from the same bin
dir, so ``loopback`` is linked there from the host's CNI plugins (containernetworking-plugins).

The launcher is a few lines behind a shebang naming this interpreter's real binary with ``-ISB``
(isolated, no site, no bytecode writing): no venv, no PATH lookup, no pyenv shim between containerd
and the plugin. It hands the plugin what capsa's configuration says of its daemon (the address,
``cni.daemon_listen``, and how long to wait, ``cni.plugin_timeout``), which the conflist therefore
does not carry: the plugin reads no config on its way to the daemon. It imports plugin.py,
installed as a module in ``capsa-cni.lib`` next to it with its bytecode, so that no exec compiles
the plugin (about 2 ms of each call). The bytecode is checked against the source's hash on import:
whatever the files' state, an exec runs the module that is there, from bytecode when it matches,
from source otherwise. Every file is replaced atomically and only when its content changes, since
containerd may run the plugin or re-read the conflist at any moment and reloads confs that change;
the module goes first, the launcher that imports it last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from capsa.cni.protocol import DEFAULT_VERSION, ErrorCode
from capsa.config import Config
from capsa.files import write_if_changed
from capsa.log import get_logger

log = get_logger(__name__)

PLUGIN_TYPE = "capsa-cni"
# The directory next to the launcher that holds the plugin module and its bytecode.
PLUGIN_LIB_DIR = "capsa-cni.lib"
PLUGIN_MODULE = "capsa_cni_plugin"
CONFLIST_NAME = "10-capsa.conflist"
CONFLIST_VERSION = "1.0.0"
# Where distributions put the reference CNI plugins (Debian's containernetworking-plugins first).
REFERENCE_PLUGIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"), Path("/usr/libexec/cni"))
# The kernel reads at most this much of a shebang line (BINPRM_BUF_SIZE, less "#!" and "\n").
_SHEBANG_MAX = 253
# A .pyc header: magic number, flags, then the source's hash (PEP 552).
_PYC_HASH_BASED_CHECKED = 0b11


def install_cni(cfg: Config, *, plugin_dirs: Sequence[Path] = REFERENCE_PLUGIN_DIRS) -> None:
    """Writes ``<cni_bin_dir>/capsa-cni`` (and the module it runs, in ``capsa-cni.lib``) and
    ``<cni_conf_dir>/10-capsa.conflist``, and links ``<cni_bin_dir>/loopback`` to the first
    loopback plugin found in ``plugin_dirs``."""
    loopback = _find_loopback(plugin_dirs)
    if _link_if_changed(cfg.cni_bin_dir / "loopback", loopback):
        log.info("CNI loopback plugin linked", path=str(cfg.cni_bin_dir / "loopback"))
    lib = cfg.cni_bin_dir / PLUGIN_LIB_DIR
    if _install_plugin_module(lib):
        log.info("CNI plugin module compiled", path=str(lib))
    launcher = launcher_source(
        real_interpreter(), lib, cfg.cni_daemon_address, cfg.cni.plugin_timeout
    )
    if write_if_changed(cfg.cni_bin_dir / PLUGIN_TYPE, launcher.encode(), 0o755):
        log.info("CNI plugin installed", path=str(cfg.cni_bin_dir / PLUGIN_TYPE))
    conflist = json.dumps(conflist_for(cfg), indent=2) + "\n"
    if write_if_changed(cfg.cni_conf_dir / CONFLIST_NAME, conflist.encode(), 0o644):
        log.info("CNI conflist written", path=str(cfg.cni_conf_dir / CONFLIST_NAME))


def _find_loopback(plugin_dirs: Sequence[Path]) -> Path:
    for directory in plugin_dirs:
        candidate = directory / "loopback"
        if os.access(candidate, os.X_OK):
            return candidate
    searched = ", ".join(str(d) for d in plugin_dirs)
    raise FileNotFoundError(
        f"containerd needs the CNI loopback plugin, found in none of {searched}: install the "
        "reference CNI plugins (Debian: apt-get install containernetworking-plugins)"
    )


def real_interpreter() -> str:
    """The running interpreter's binary, symlinks (venv, python3 -> python3.11) resolved."""
    if not sys.executable:
        raise RuntimeError("cannot install capsa-cni: Python does not know its own executable")
    return os.path.realpath(sys.executable)


def launcher_source(interpreter: str, lib: Path, daemon: str, timeout: float) -> str:
    """The launcher: ``interpreter`` runs the plugin module installed in ``lib``, which reaches
    the daemon at ``daemon`` and waits ``timeout`` seconds at most for its answer."""
    # The kernel hands everything after the interpreter path to it as one argument: hence "-ISB".
    shebang = f"{interpreter} -ISB"
    if not Path(interpreter).is_absolute() or any(c.isspace() for c in interpreter):
        raise ValueError(
            f"cannot use {interpreter!r} in capsa-cni's shebang: it needs an absolute path "
            "without spaces"
        )
    if len(shebang) > _SHEBANG_MAX:
        raise ValueError(f"the interpreter path {interpreter!r} is too long for a shebang line")
    # Written now, as the plugin would write it: the launcher has no json module to do it.
    missing = json.dumps(
        {
            "cniVersion": DEFAULT_VERSION,
            "code": int(ErrorCode.INTERNAL),
            "msg": f"capsa-cni cannot load its plugin module from {lib}",
            "details": "`capsa up` installs it again",
        }
    )
    return (
        f"#!{shebang}\n"
        f"# capsa-cni: capsa.cni.plugin, run from its bytecode in {PLUGIN_LIB_DIR}.\n"
        "import sys\n\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "try:\n"
        f"    from {PLUGIN_MODULE} import run_as_process\n"
        "except ImportError:\n"
        f"    print({missing!r})\n"
        "    sys.exit(1)\n"
        f"run_as_process({daemon!r}, {float(timeout)!r})\n"
    )


def _install_plugin_module(lib: Path) -> bool:
    """Writes plugin.py into ``lib`` with its bytecode, unless they are there; True if it wrote."""
    source = resources.files("capsa.cni").joinpath("plugin.py").read_bytes()
    module = lib / f"{PLUGIN_MODULE}.py"
    bytecode = Path(importlib.util.cache_from_source(str(module)))
    wrote = write_if_changed(module, source, 0o644)
    if wrote or not _bytecode_matches(bytecode, source):
        # Hash-checked, so that an import never trusts bytecode of another source, whatever the
        # files' times; py_compile replaces the file atomically.
        py_compile.compile(
            str(module),
            cfile=str(bytecode),
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )
        wrote = True
    return wrote


def _bytecode_matches(bytecode: Path, source: bytes) -> bool:
    """Whether ``bytecode`` is this interpreter's hash-checked bytecode of ``source``."""
    try:
        with bytecode.open("rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return False
    return (
        header[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(header[4:8], "little") == _PYC_HASH_BASED_CHECKED
        and header[8:16] == importlib.util.source_hash(source)
    )


def conflist_for(cfg: Config) -> dict[str, Any]:
    return {
        "cniVersion": CONFLIST_VERSION,
        "name": cfg.cni.network_name,
        "plugins": [
            {
                "type": PLUGIN_TYPE,
                # Declared now so that containerd passes runtimeConfig.portMappings once capsa
                # publishes ports.
                "capabilities": {"portMappings": True},
            }
        ],
    }


def _link_if_changed(path: Path, target: Path) -> bool:
    """Atomically points the symlink ``path`` at ``target`` unless it already does."""
    if path.is_symlink() and path.readlink() == target:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(path)
    return True

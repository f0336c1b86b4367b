"""Puts capsa-cni where containerd looks: the launcher in the CNI bin dir, the conflist in net.d.

containerd 1.6 also runs the reference ``loopback`` plugin for every sandbox, from the same bin
dir, so ``loopback`` is linked there from the host's CNI plugins (containernetworking-plugins).

The launcher is plugin.py's source behind a shebang naming this interpreter's real binary with
``-IS`` (isolated, no site): no venv, no PATH lookup, no pyenv shim between containerd and the
plugin. Both files are replaced atomically and only when their content changes, since containerd
may run the plugin or re-read the conflist at any moment and reloads confs that change.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from capsa.config import Config
from capsa.files import write_if_changed
from capsa.log import get_logger

log = get_logger(__name__)

PLUGIN_TYPE = "capsa-cni"
CONFLIST_NAME = "10-capsa.conflist"
CONFLIST_VERSION = "1.0.0"
# Where distributions put the reference CNI plugins (Debian's containernetworking-plugins first).
REFERENCE_PLUGIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"), Path("/usr/libexec/cni"))
# The kernel reads at most this much of a shebang line (BINPRM_BUF_SIZE, less "#!" and "\n").
_SHEBANG_MAX = 253


def install_cni(cfg: Config, *, plugin_dirs: Sequence[Path] = REFERENCE_PLUGIN_DIRS) -> None:
    """Writes ``<cni_bin_dir>/capsa-cni`` and ``<cni_conf_dir>/10-capsa.conflist`` and links
    ``<cni_bin_dir>/loopback`` to the first loopback plugin found in ``plugin_dirs``."""
    loopback = _find_loopback(plugin_dirs)
    if _link_if_changed(cfg.cni_bin_dir / "loopback", loopback):
        log.info("CNI loopback plugin linked", path=str(cfg.cni_bin_dir / "loopback"))
    launcher = launcher_source(real_interpreter())
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


def launcher_source(interpreter: str) -> str:
    # The kernel hands everything after the interpreter path to it as one argument: hence "-IS".
    shebang = f"{interpreter} -IS"
    if not Path(interpreter).is_absolute() or any(c.isspace() for c in interpreter):
        raise ValueError(
            f"cannot use {interpreter!r} in capsa-cni's shebang: it needs an absolute path "
            "without spaces"
        )
    if len(shebang) > _SHEBANG_MAX:
        raise ValueError(f"the interpreter path {interpreter!r} is too long for a shebang line")
    plugin = resources.files("capsa.cni").joinpath("plugin.py").read_text(encoding="utf-8")
    return f"#!{shebang}\n{plugin}"


def conflist_for(cfg: Config) -> dict[str, Any]:
    return {
        "cniVersion": CONFLIST_VERSION,
        "name": cfg.cni.network_name,
        "plugins": [
            {
                "type": PLUGIN_TYPE,
                "daemon": cfg.cni_daemon_address,
                "timeout": cfg.cni.plugin_timeout,
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

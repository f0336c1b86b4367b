from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from capsa.cni import plugin
from capsa.cni.install import install_cni, launcher_source
from capsa.config import CniConfig, Config


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A stand-in for /usr/lib/cni holding an executable loopback."""
    directory = tmp_path / "reference-plugins"
    directory.mkdir()
    loopback = directory / "loopback"
    loopback.write_text("#!/bin/sh\n")
    loopback.chmod(0o755)
    return directory


@pytest.fixture
def install(plugin_dir: Path) -> Callable[[Config], None]:
    return functools.partial(install_cni, plugin_dirs=(plugin_dir,))


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return Config(
        state_dir=tmp_path,
        cni=CniConfig(daemon_listen="127.0.0.1:19519", network_name="capsa-test", plugin_timeout=7),
    )


def test_launcher_runs_the_plugin_module_under_the_real_interpreter(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    install(cfg)
    launcher = cfg.cni_bin_dir / "capsa-cni"
    shebang = launcher.read_text().split("\n", 1)[0]
    assert shebang == f"#!{os.path.realpath(sys.executable)} -ISB"
    interpreter = Path(shebang[2:].split()[0])
    assert interpreter.is_absolute()
    assert not interpreter.is_symlink()
    module = cfg.cni_bin_dir / "capsa-cni.lib" / "capsa_cni_plugin.py"
    assert module.read_text() == Path(plugin.__file__).read_text()
    assert launcher.stat().st_mode & 0o777 == 0o755


def run_launcher(cfg: Config, command: str, config: bytes) -> subprocess.CompletedProcess[bytes]:
    """The installed launcher, run as a runtime runs it: ``command``, the config on stdin."""
    return subprocess.run(
        [str(cfg.cni_bin_dir / "capsa-cni")],
        env={"CNI_COMMAND": command},
        input=config,
        capture_output=True,
        timeout=30,
    )


def test_launcher_executes(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    run = run_launcher(cfg, "VERSION", b'{"cniVersion": "0.3.1"}')
    assert run.returncode == 0
    assert json.loads(run.stdout)["cniVersion"] == "0.3.1"


def run_launcher_verbosely(cfg: Config, *flags: str) -> str:
    """Runs the installed launcher as its shebang does, with ``flags``; returns its stderr."""
    launcher = cfg.cni_bin_dir / "capsa-cni"
    interpreter, options = launcher.read_text().split("\n", 1)[0][2:].split()
    run = subprocess.run(
        [interpreter, options, *flags, str(launcher)],
        env={"CNI_COMMAND": "VERSION"},
        input=b'{"cniVersion": "1.0.0"}',
        capture_output=True,
        timeout=30,
        check=True,
    )
    return run.stderr.decode()


def test_launcher_runs_the_plugin_from_its_cached_bytecode(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    install(cfg)
    module = cfg.cni_bin_dir / "capsa-cni.lib" / "capsa_cni_plugin.py"
    bytecode = importlib.util.cache_from_source(str(module))
    loaded = run_launcher_verbosely(cfg, "-v")
    assert f"# code object from '{bytecode}'" in loaded
    assert f"# code object from {module}" not in loaded


def test_launcher_answers_whole_and_skips_the_interpreters_clean_up(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    install(cfg)
    # -v reports the clean-up at exit ("# cleanup[...]"): none once the answer is out.
    assert "# cleanup" not in run_launcher_verbosely(cfg, "-v")
    refused = run_launcher(cfg, "ADD", b'{"cniVersion": "1.0.0", "name": "n", "type": "capsa-cni"}')
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["code"] == 4


def test_launcher_imports_only_builtin_modules_and_the_plugin(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    # Start-up time is the plugin's cost: the launcher must not import json, socket, re or os.
    install(cfg)
    imports = run_launcher_verbosely(cfg, "-X", "importtime").splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in imports if "|" in line}
    bare = subprocess.run(
        [os.path.realpath(sys.executable), "-ISB", "-X", "importtime", "-c", "pass"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    at_start = {line.rsplit("|", 1)[1].strip() for line in bare.stderr.decode().splitlines()}
    assert "capsa_cni_plugin" in imported
    assert imported - at_start <= {"capsa_cni_plugin", "_json", "_socket"}, imported - at_start


def test_launcher_without_its_module_answers_a_cni_error(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    install(cfg)
    shutil.rmtree(cfg.cni_bin_dir / "capsa-cni.lib")
    run = run_launcher(cfg, "ADD", b"{}")
    assert run.returncode == 1
    error = json.loads(run.stdout)
    assert error["code"] == 999
    assert str(cfg.cni_bin_dir / "capsa-cni.lib") in error["msg"]
    assert "capsa up" in error["details"]


def test_conflist(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    conflist = json.loads((cfg.cni_conf_dir / "10-capsa.conflist").read_text())
    assert conflist == {
        "cniVersion": "1.0.0",
        "name": "capsa-test",
        "plugins": [
            {
                "type": "capsa-cni",
                "capabilities": {"portMappings": True},
            }
        ],
    }


def test_launcher_reaches_the_configured_daemon(
    cfg: Config, install: Callable[[Config], None], tmp_path: Path
) -> None:
    # The daemon address and the timeout come from capsa's configuration, through the launcher.
    address = f"unix:{tmp_path / 'nobody-listens.sock'}"
    install(dataclasses.replace(cfg, cni=dataclasses.replace(cfg.cni, daemon_listen=address)))
    assert "run_as_process(" in (cfg.cni_bin_dir / "capsa-cni").read_text()
    config = b'{"cniVersion": "1.0.0", "name": "capsa-test", "type": "capsa-cni"}'
    run = subprocess.run(
        [str(cfg.cni_bin_dir / "capsa-cni")],
        env={
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "c1",
            "CNI_NETNS": "/run/netns/x",
            "CNI_IFNAME": "eth0",
        },
        input=config,
        capture_output=True,
        timeout=30,
    )
    error = json.loads(run.stdout)
    assert (run.returncode, error["code"]) == (1, 11)
    assert address in error["msg"]


def test_install_rewrites_only_what_changed(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    launcher = cfg.cni_bin_dir / "capsa-cni"
    module = cfg.cni_bin_dir / "capsa-cni.lib" / "capsa_cni_plugin.py"
    bytecode = Path(importlib.util.cache_from_source(str(module)))
    conflist = cfg.cni_conf_dir / "10-capsa.conflist"
    before = {p: p.stat().st_ino for p in (launcher, module, bytecode, conflist)}
    install(cfg)
    assert {p: p.stat().st_ino for p in before} == before

    install(dataclasses.replace(cfg, cni=dataclasses.replace(cfg.cni, daemon_listen="unix:/x")))
    # Replaced by rename (a new inode), never rewritten in place.
    assert launcher.stat().st_ino != before[launcher]
    assert "'unix:/x'" in launcher.read_text()
    assert {p: p.stat().st_ino for p in (module, bytecode, conflist)} == {
        p: before[p] for p in (module, bytecode, conflist)
    }
    assert sorted(p.name for p in cfg.cni_bin_dir.iterdir()) == [
        "capsa-cni",
        "capsa-cni.lib",
        "loopback",
    ]


def test_install_replaces_bytecode_that_does_not_match_the_module(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    install(cfg)
    module = cfg.cni_bin_dir / "capsa-cni.lib" / "capsa_cni_plugin.py"
    bytecode = Path(importlib.util.cache_from_source(str(module)))
    # Bytecode of another source, as an older capsa would have left it.
    other = cfg.cni_bin_dir / "other.py"
    other.write_text("def main() -> int:\n    return 3\n")
    py_compile.compile(
        str(other),
        cfile=str(bytecode),
        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
    )
    stale = bytecode.stat().st_ino

    install(cfg)

    assert bytecode.stat().st_ino != stale
    assert f"# code object from '{bytecode}'" in run_launcher_verbosely(cfg, "-v")


def test_install_restores_the_launcher_mode(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    launcher = cfg.cni_bin_dir / "capsa-cni"
    launcher.chmod(0o644)
    install(cfg)
    assert launcher.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("interpreter", ["python3", "/opt/my python/bin/python3", "/x" * 200])
def test_launcher_refuses_unusable_interpreters(interpreter: str) -> None:
    with pytest.raises(ValueError, match=r"interpreter|shebang"):
        launcher_source(interpreter, Path("/var/lib/capsa/cni/bin/capsa-cni.lib"), "unix:/x", 5)


def test_loopback_is_linked_from_the_reference_plugins(cfg: Config, plugin_dir: Path) -> None:
    install_cni(cfg, plugin_dirs=(plugin_dir,))
    loopback = cfg.cni_bin_dir / "loopback"
    assert loopback.readlink() == plugin_dir / "loopback"
    before = loopback.lstat().st_ino
    install_cni(cfg, plugin_dirs=(plugin_dir,))
    assert loopback.lstat().st_ino == before


def test_missing_loopback_says_what_to_install(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="containernetworking-plugins"):
        install_cni(cfg, plugin_dirs=(tmp_path / "nowhere",))

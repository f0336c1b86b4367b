from __future__ import annotations

import dataclasses
import functools
import json
import os
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


def test_launcher_runs_plugin_source_under_the_real_interpreter(
    cfg: Config, install: Callable[[Config], None]
) -> None:
    install(cfg)
    launcher = cfg.cni_bin_dir / "capsa-cni"
    shebang, source = launcher.read_text().split("\n", 1)
    assert shebang == f"#!{os.path.realpath(sys.executable)} -IS"
    interpreter = Path(shebang[2:].split()[0])
    assert interpreter.is_absolute()
    assert not interpreter.is_symlink()
    assert source == Path(plugin.__file__).read_text()
    assert launcher.stat().st_mode & 0o777 == 0o755


def test_launcher_executes(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    run = subprocess.run(
        [str(cfg.cni_bin_dir / "capsa-cni")],
        env={"CNI_COMMAND": "VERSION"},
        input=b'{"cniVersion": "0.3.1"}',
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert json.loads(run.stdout)["cniVersion"] == "0.3.1"


def test_conflist(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    conflist = json.loads((cfg.cni_conf_dir / "10-capsa.conflist").read_text())
    assert conflist == {
        "cniVersion": "1.0.0",
        "name": "capsa-test",
        "plugins": [
            {
                "type": "capsa-cni",
                "daemon": "127.0.0.1:19519",
                "timeout": 7,
                "capabilities": {"portMappings": True},
            }
        ],
    }


def test_install_rewrites_only_what_changed(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    launcher = cfg.cni_bin_dir / "capsa-cni"
    conflist = cfg.cni_conf_dir / "10-capsa.conflist"
    before = {p: p.stat().st_ino for p in (launcher, conflist)}
    install(cfg)
    assert {p: p.stat().st_ino for p in before} == before

    install(dataclasses.replace(cfg, cni=dataclasses.replace(cfg.cni, daemon_listen="unix:/x")))
    # Replaced by rename (a new inode), never rewritten in place.
    assert conflist.stat().st_ino != before[conflist]
    assert json.loads(conflist.read_text())["plugins"][0]["daemon"] == "unix:/x"
    assert launcher.stat().st_ino == before[launcher]
    assert sorted(p.name for p in cfg.cni_conf_dir.iterdir()) == ["10-capsa.conflist"]


def test_install_restores_the_launcher_mode(cfg: Config, install: Callable[[Config], None]) -> None:
    install(cfg)
    launcher = cfg.cni_bin_dir / "capsa-cni"
    launcher.chmod(0o644)
    install(cfg)
    assert launcher.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("interpreter", ["python3", "/opt/my python/bin/python3", "/x" * 200])
def test_launcher_refuses_unusable_interpreters(interpreter: str) -> None:
    with pytest.raises(ValueError, match=r"interpreter|shebang"):
        launcher_source(interpreter)


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

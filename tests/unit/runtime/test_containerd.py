from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from capsa.config import AgentConfig, Config, ContainerdConfig, RegistryConfig
from capsa.runtime.containerd import (
    CRI_PLUGIN,
    Containerd,
    ContainerdError,
    certs_dir,
    render_containerd_config,
    render_hosts_toml,
    write_certs_d,
)
from capsa.runtime.process import ProcessError

SANDBOX_IMAGE = "127.0.0.1:5999/capsa/pause:3.9"


def _config(state_dir: Path, **sections: Any) -> Config:
    sections.setdefault("registry", RegistryConfig(listen="127.0.0.1:5999"))
    return Config(state_dir=state_dir, **sections)


def _render(cfg: Config) -> dict[str, Any]:
    return tomllib.loads(render_containerd_config(cfg, SANDBOX_IMAGE))


def test_everything_lives_under_the_containerd_dir(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    config = _render(cfg)
    assert config["version"] == 2
    base = cfg.containerd_dir
    assert Path(config["root"]).is_relative_to(base)
    assert Path(config["state"]).is_relative_to(base)
    assert config["grpc"]["address"] == cfg.cri_socket
    assert Path(config["plugins"]["io.containerd.internal.v1.opt"]["path"]).is_relative_to(base)
    assert len({config["root"], config["state"]}) == 2


def test_cri_plugin_settings(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cri = _render(cfg)["plugins"][CRI_PLUGIN]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == SANDBOX_IMAGE
    assert cri["cni"] == {
        "bin_dir": str(cfg.cni_bin_dir),
        "conf_dir": str(cfg.cni_conf_dir),
        "max_conf_num": 1,
    }
    assert cri["containerd"]["snapshotter"] == "overlayfs"
    assert cri["registry"] == {"config_path": str(cfg.containerd_dir / "certs.d")}


def test_one_runtime_table_per_handler_with_its_own_runc_root(tmp_path: Path) -> None:
    cfg = _config(tmp_path, agent=AgentConfig(runtimes=("runc", "crun")))
    containerd = _render(cfg)["plugins"][CRI_PLUGIN]["containerd"]
    assert containerd["default_runtime_name"] == "runc"
    runtimes = containerd["runtimes"]
    assert set(runtimes) == {"runc", "crun"}
    roots = set()
    for handler, table in runtimes.items():
        assert table["runtime_type"] == "io.containerd.runc.v2"
        options = table["options"]
        assert Path(options["BinaryName"]).name == handler
        assert options["SystemdCgroup"] is False
        assert Path(options["Root"]).is_relative_to(cfg.containerd_dir)
        roots.add(options["Root"])
    assert len(roots) == 2


def test_two_instances_share_no_path(tmp_path: Path) -> None:
    def paths(config: dict[str, Any]) -> set[str]:
        found = set()
        for value in config.values():
            if isinstance(value, dict):
                found |= paths(value)
            elif isinstance(value, str) and value.startswith("/"):
                found.add(value)
        return found

    first = _render(_config(tmp_path / "a"))
    second = _render(_config(tmp_path / "b"))
    binary = first["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]["runc"]["options"]["BinaryName"]
    # Only the handler's binary is shared.
    assert paths(first) & paths(second) <= {binary}


def test_no_legacy_mirror_tables_and_only_useless_plugins_disabled(tmp_path: Path) -> None:
    config = _render(_config(tmp_path))
    registry = config["plugins"][CRI_PLUGIN]["registry"]
    assert "mirrors" not in registry and "configs" not in registry
    disabled = config["disabled_plugins"]
    assert "io.containerd.snapshotter.v1.aufs" in disabled
    for needed in (
        CRI_PLUGIN,
        "io.containerd.snapshotter.v1.overlayfs",
        "io.containerd.runtime.v2.task",
        # 1.6's tasks service refuses to load without a v1 runtime plugin.
        "io.containerd.runtime.v1.linux",
    ):
        assert needed not in disabled


def test_hosts_toml_sends_docker_io_to_the_local_registry_first(tmp_path: Path) -> None:
    hosts = tomllib.loads(render_hosts_toml(_config(tmp_path), "docker.io"))
    assert hosts["server"] == "https://registry-1.docker.io"
    assert hosts["host"] == {"http://127.0.0.1:5999": {"capabilities": ["pull", "resolve"]}}


def test_hosts_toml_of_other_hosts_and_wildcard_listen(tmp_path: Path) -> None:
    cfg = _config(tmp_path, registry=RegistryConfig(listen="0.0.0.0:5998"))
    hosts = tomllib.loads(render_hosts_toml(cfg, "quay.io"))
    assert hosts["server"] == "https://quay.io"
    assert list(hosts["host"]) == ["http://127.0.0.1:5998"]


def test_certs_d_has_one_hosts_toml_per_mirror_and_drops_others(tmp_path: Path) -> None:
    cfg = _config(tmp_path, registry=RegistryConfig(mirror_of=("docker.io", "ghcr.io")))
    stale = certs_dir(cfg) / "old.example" / "hosts.toml"
    stale.parent.mkdir(parents=True)
    stale.write_text("server = 'https://old.example'\n")
    write_certs_d(cfg)
    assert sorted(p.name for p in certs_dir(cfg).iterdir()) == ["docker.io", "ghcr.io"]
    assert (certs_dir(cfg) / "ghcr.io" / "hosts.toml").read_text() == render_hosts_toml(
        cfg, "ghcr.io"
    )


def test_certs_d_is_empty_without_the_registry(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    write_certs_d(cfg)
    assert (certs_dir(cfg) / "docker.io" / "hosts.toml").exists()
    write_certs_d(_config(tmp_path, registry=RegistryConfig(enabled=False)))
    assert list(certs_dir(cfg).iterdir()) == []


async def test_an_operator_socket_starts_nothing_and_must_answer(tmp_path: Path) -> None:
    socket = tmp_path / "nothing-here.sock"
    cfg = _config(tmp_path, containerd=ContainerdConfig(socket=str(socket), start_timeout=1))
    containerd = Containerd(cfg)
    with pytest.raises(ContainerdError, match=r"nothing-here\.sock \(setting containerd\.socket\)"):
        await containerd.ensure_running(SANDBOX_IMAGE)
    assert not containerd.process.is_running()
    assert not cfg.containerd_dir.exists()
    await containerd.stop()


def _failing_program(path: Path, message: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    path.chmod(0o755)
    return path


async def test_a_containerd_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    binary = _failing_program(tmp_path / "bin" / "containerd", "failed to load TOML: line 3: boom")
    cfg = _config(tmp_path, containerd=ContainerdConfig(binary=str(binary), start_timeout=5))
    containerd = Containerd(cfg)
    with pytest.raises(ProcessError, match="containerd exited before") as err:
        await containerd.ensure_running(SANDBOX_IMAGE)
    assert "failed to load TOML: line 3: boom" in str(err.value)
    # It wrote its config and mirrors before starting.
    assert containerd.config_path.read_text() == render_containerd_config(cfg, SANDBOX_IMAGE)
    assert (certs_dir(cfg) / "docker.io" / "hosts.toml").exists()

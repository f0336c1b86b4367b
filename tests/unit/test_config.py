from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from capsa.config import Config, ConfigError, load_config


def test_defaults_with_an_empty_file_and_no_environment(tmp_path: Path) -> None:
    cfg = load_config(_empty(tmp_path), environ={})
    assert cfg.state_dir == Path("/var/lib/capsa")
    assert cfg.api.listen == "127.0.0.1:9517"
    assert cfg.agent.runtimes == ("runc",)
    assert cfg.cri_socket == "/var/lib/capsa/containerd/containerd.sock"
    assert cfg.database_url == "sqlite:////var/lib/capsa/capsa.db"
    # Only root reaches the CNI daemon unless an operator says otherwise.
    assert cfg.cni_daemon_address == "unix:/var/lib/capsa/run/cni-daemon.sock"


def test_file_then_environment_win_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "capsa.toml"
    path.write_text(
        'state_dir = "/srv/capsa"\n'
        '[api]\nlisten = "0.0.0.0:1"\nmax_limit = 50\n'
        '[agent]\nruntimes = ["runc", "crun"]\n'
    )
    cfg = load_config(
        path, environ={"CAPSA_API_LISTEN": "127.0.0.1:2", "CAPSA_REGISTRY_ENABLED": "no"}
    )
    assert cfg.state_dir == Path("/srv/capsa")
    assert cfg.api.listen == "127.0.0.1:2"
    assert cfg.api.max_limit == 50
    assert cfg.agent.runtimes == ("runc", "crun")
    assert cfg.registry.enabled is False
    # Derived paths follow state_dir.
    assert cfg.cni_bin_dir == Path("/srv/capsa/cni/bin")


def test_environment_lists_and_numbers(tmp_path: Path) -> None:
    cfg = load_config(
        environ={
            "CAPSA_CONFIG": str(_empty(tmp_path)),
            "CAPSA_STATE_DIR": "/tmp/x",
            "CAPSA_AGENT_RUNTIMES": "runc, crun",
            "CAPSA_AGENT_CPU_ALLOCATION_RATIO": "2.5",
        },
    )
    assert cfg.state_dir == Path("/tmp/x")
    assert cfg.agent.runtimes == ("runc", "crun")
    assert cfg.agent.cpu_allocation_ratio == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ("[api]\nlisten = 5\n", "api.listen"),
        ("[api]\nbogus = 5\n", "unknown setting 'api.bogus'"),
        ("[api\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "capsa.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path, environ={})


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CAPSA_API_MAX_LIMIT"):
        load_config(environ={"CAPSA_CONFIG": str(_empty(tmp_path)), "CAPSA_API_MAX_LIMIT": "x"})


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("environment", "interval"),
    [
        # All-in-one on SQLite: wake-ups stay within the process.
        ({}, None),
        ({"CAPSA_DATABASE_URL": "postgresql+psycopg://capsa@db/capsa"}, 0.2),
        ({"CAPSA_DATABASE_WAKEUPS": "database", "CAPSA_DATABASE_WAKEUP_POLL_INTERVAL": "0.1"}, 0.1),
        (
            {"CAPSA_DATABASE_URL": "postgresql://db/capsa", "CAPSA_DATABASE_WAKEUPS": "process"},
            None,
        ),
    ],
)
def test_wakeups_cross_processes_through_the_database_when_it_is_shared(
    tmp_path: Path, environment: dict[str, str], interval: float | None
) -> None:
    assert load_config(_empty(tmp_path), environ=environment).wakeup_poll_interval == interval


@pytest.mark.parametrize(
    "environment",
    [{"CAPSA_DATABASE_WAKEUPS": "redis"}, {"CAPSA_DATABASE_WAKEUP_POLL_INTERVAL": "0"}],
)
def test_unusable_wakeup_settings_are_refused(tmp_path: Path, environment: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"database\.wakeup"):
        load_config(_empty(tmp_path), environ=environment)


def test_a_negative_bridge_linger_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cni\.bridge_linger"):
        load_config(_empty(tmp_path), environ={"CAPSA_CNI_BRIDGE_LINGER": "-1"})
    assert (
        load_config(_empty(tmp_path), environ={"CAPSA_CNI_BRIDGE_LINGER": "0"}).cni.bridge_linger
        == 0
    )


def test_every_setting_is_documented_with_its_variable_and_default() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in doc.splitlines()
        if line.startswith("| `")
    }
    cfg = Config()
    expected: dict[str, tuple[str, object]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sf in dataclasses.fields(value):
                expected[f"{f.name}.{sf.name}"] = (
                    f"CAPSA_{f.name}_{sf.name}".upper(),
                    getattr(value, sf.name),
                )
        else:
            expected[f.name] = (f"CAPSA_{f.name}".upper(), value)
    assert set(rows) == set(expected), "docs/configuration.md and config.py list other keys"
    for key, (variable, default) in expected.items():
        assert f"`{variable}`" in rows[key], key
        assert f"`{_toml(default)}`" in rows[key], (
            f"{key}: the documented default is not {default!r}"
        )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)

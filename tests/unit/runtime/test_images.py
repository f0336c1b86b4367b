from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from capsa.config import Config, RegistryConfig
from capsa.runtime.images import (
    ImageBuildError,
    busybox_recipe,
    busybox_version,
    layout_digest,
    pause_recipe,
    sandbox_image,
)


def test_sandbox_image_lives_in_the_local_registry(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path, registry=RegistryConfig(listen="0.0.0.0:5123"))
    assert sandbox_image(cfg) == "127.0.0.1:5123/capsa/pause:3.9"


def test_sandbox_image_without_a_local_registry(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path, registry=RegistryConfig(enabled=False))
    assert sandbox_image(cfg) == "registry.k8s.io/pause:3.9"


def test_busybox_version_from_the_banner_in_the_binary() -> None:
    binary = b"\x7fELF\x00junk\x00BusyBox v1.36.1 (2023-06-01) multi-call binary.\x00more"
    assert busybox_version(binary) == "1.36"


def test_busybox_without_a_banner_is_refused() -> None:
    with pytest.raises(ImageBuildError, match="version banner"):
        busybox_version(b"\x7fELF not busybox")


def test_busybox_recipe_tags_latest_and_version(tmp_path: Path) -> None:
    binary = tmp_path / "busybox"
    binary.write_bytes(b"BusyBox v1.35.0 (Debian)")
    recipe = busybox_recipe(binary)
    assert recipe.repository == "library/busybox"
    assert recipe.tags == ("latest", "1.35")
    assert "--config.cmd" in recipe.config and "sh" in recipe.config
    assert any(arg.startswith("PATH=") and "/bin" in arg for arg in recipe.config)


def test_missing_busybox_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="busybox-static"):
        busybox_recipe(tmp_path / "nope")


def test_cache_keys_follow_the_inputs(tmp_path: Path) -> None:
    source = tmp_path / "pause.c"
    source.write_text("int main(void) { return 0; }\n")
    first = pause_recipe(source).inputs_hash
    assert pause_recipe(source).inputs_hash == first
    source.write_text("int main(void) { return 1; }\n")
    assert pause_recipe(source).inputs_hash != first

    binary = tmp_path / "busybox"
    binary.write_bytes(b"BusyBox v1.35.0 a")
    before = busybox_recipe(binary).inputs_hash
    binary.write_bytes(b"BusyBox v1.35.0 b")
    assert busybox_recipe(binary).inputs_hash != before


def test_pause_recipe_is_the_sandbox_image(tmp_path: Path) -> None:
    recipe = pause_recipe()
    cfg = Config(state_dir=tmp_path, registry=RegistryConfig(listen="127.0.0.1:5000"))
    assert sandbox_image(cfg) == f"127.0.0.1:5000/{recipe.repository}:{recipe.tags[0]}"
    assert recipe.config[recipe.config.index("--config.entrypoint") + 1] == "/pause"


def test_layout_digest_reads_the_index(tmp_path: Path) -> None:
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:1234",
                "size": 348,
                "annotations": {"org.opencontainers.image.ref.name": "image"},
            }
        ],
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert layout_digest(tmp_path) == "sha256:1234"
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "other"}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageBuildError, match="remove it to rebuild"):
        layout_digest(tmp_path)

"""The images a host needs without internet, built from what the host already has.

- ``<registry>/capsa/pause:3.9``: the sandbox image, capsa's own pause program (pause.c).
- ``<registry>/library/busybox:latest`` and ``:<version>`` (e.g. ``1.35``): Debian's static
  busybox and its applet links. Through the docker.io mirror, ``busybox``,
  ``docker.io/library/busybox:latest`` and ``busybox:1.35`` all resolve to it.

Each image is an OCI layout built with umoci in ``cfg.image_cache_dir``, named after a hash of
its inputs, built in a temporary directory and renamed into place, so that concurrent capsa
instances can share one cache. Only tags that the registry lacks (or that point elsewhere) are
pushed, with skopeo.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from capsa.config import Config
from capsa.log import get_logger
from capsa.runtime.errors import HostRuntimeError
from capsa.runtime.process import run_command
from capsa.runtime.registry import LocalRegistry, registry_host

log = get_logger(__name__)

# Part of every cache key: change it when the way images are built changes.
FORMAT_VERSION = "1"

PAUSE_SOURCE = Path(__file__).with_name("pause.c")
PAUSE_REPOSITORY = "capsa/pause"
PAUSE_TAG = "3.9"
# containerd's sandbox image when capsa runs no registry of its own.
UPSTREAM_SANDBOX_IMAGE = "registry.k8s.io/pause:3.9"

BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_REPOSITORY = "library/busybox"

_LAYOUT_REF = "image"
_COMMAND_TIMEOUT = 120.0
_SEARCH_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnobody:x:65534:\n"


class ImageBuildError(HostRuntimeError):
    """A local image could not be built or pushed."""


@dataclass(frozen=True)
class ImageRecipe:
    """How to make one image, and under which names the registry serves it."""

    name: str
    repository: str
    tags: tuple[str, ...]
    # A hash of everything the image is made of: the cache key.
    inputs_hash: str
    # Arguments of `umoci config`.
    config: tuple[str, ...]
    # Fills the image's root filesystem.
    populate: Callable[[Path], Awaitable[None]]


def sandbox_image(cfg: Config) -> str:
    """The pause image containerd runs as every sandbox's first process."""
    if cfg.containerd.sandbox_image:
        return cfg.containerd.sandbox_image
    if not cfg.registry.enabled:
        return UPSTREAM_SANDBOX_IMAGE
    return f"{registry_host(cfg)}/{PAUSE_REPOSITORY}:{PAUSE_TAG}"


async def ensure_local_images(cfg: Config, registry: LocalRegistry) -> None:
    """Builds the local images that are not cached and pushes what the registry lacks."""
    recipes = [pause_recipe(), busybox_recipe()]
    await asyncio.gather(*(_ensure_image(r, cfg.image_cache_dir, registry) for r in recipes))


def pause_recipe(source: Path = PAUSE_SOURCE) -> ImageRecipe:
    async def populate(rootfs: Path) -> None:
        await run_command(
            ["gcc", "-static", "-Os", "-s", "-o", str(rootfs / "pause"), str(source)],
            _COMMAND_TIMEOUT,
        )

    return ImageRecipe(
        name="pause",
        repository=PAUSE_REPOSITORY,
        tags=(PAUSE_TAG,),
        inputs_hash=_hash(FORMAT_VERSION.encode(), source.read_bytes()),
        config=("--config.entrypoint", "/pause", "--config.user", "65535:65535"),
        populate=populate,
    )


def busybox_recipe(binary: Path = BUSYBOX_BINARY) -> ImageRecipe:
    try:
        content = binary.read_bytes()
    except OSError as exc:
        raise ImageBuildError(f"cannot read {binary} (package busybox-static): {exc}") from exc

    async def populate(rootfs: Path) -> None:
        applets = (await run_command([str(binary), "--list-full"], _COMMAND_TIMEOUT)).split()
        _write_busybox_rootfs(rootfs, binary, applets)

    return ImageRecipe(
        name="busybox",
        repository=BUSYBOX_REPOSITORY,
        tags=("latest", busybox_version(content)),
        inputs_hash=_hash(FORMAT_VERSION.encode(), content),
        config=("--config.env", _SEARCH_PATH, "--config.cmd", "sh"),
        populate=populate,
    )


def busybox_version(binary: bytes) -> str:
    """``1.35`` from the banner every busybox carries: ``BusyBox v1.35.0 (...)``."""
    match = re.search(rb"BusyBox v(\d+)\.(\d+)", binary)
    if match is None:
        raise ImageBuildError("cannot find a version banner in the busybox binary")
    return f"{int(match[1])}.{int(match[2])}"


def _write_busybox_rootfs(rootfs: Path, binary: Path, applets: list[str]) -> None:
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, rootfs / "bin" / "busybox")
    for applet in applets:
        link = rootfs / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text(_PASSWD)
    (rootfs / "etc" / "group").write_text(_GROUP)
    (rootfs / "root").mkdir(mode=0o700, exist_ok=True)
    (rootfs / "tmp").mkdir(exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)


async def build_layout(recipe: ImageRecipe, cache_dir: Path) -> Path:
    """The OCI layout of ``recipe`` in the cache, built first when it is not there."""
    layout = cache_dir / f"{recipe.name}-{recipe.inputs_hash[:16]}"
    if _is_built(layout):
        return layout
    log.info("building image", image=recipe.name, layout=layout)
    with _build_dir(cache_dir, recipe.name) as work:
        built, bundle = work / "layout", work / "bundle"
        image = f"{built}:{_LAYOUT_REF}"
        try:
            await _umoci("init", "--layout", str(built))
            await _umoci("new", "--image", image)
            await _umoci("unpack", "--image", image, str(bundle))
            await recipe.populate(bundle / "rootfs")
            await _umoci("repack", "--image", image, str(bundle))
            await _umoci("config", "--image", image, *recipe.config)
            await _umoci("gc", "--layout", str(built))
        except HostRuntimeError as exc:
            raise ImageBuildError(f"building the {recipe.name} image failed: {exc}") from exc
        _move_into_place(built, layout)
    return layout


def _is_built(layout: Path) -> bool:
    # Layouts appear in the cache only complete, renamed from their scratch directory.
    return (layout / "index.json").is_file()


@contextlib.contextmanager
def _build_dir(cache_dir: Path, name: str) -> Iterator[Path]:
    """A scratch directory in the cache (same filesystem, so the result can be renamed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=cache_dir) as tmp:
        yield Path(tmp)


def _move_into_place(built: Path, layout: Path) -> None:
    try:
        built.rename(layout)
    except OSError:
        # Another capsa renamed its build into place first: use that one.
        if not layout.is_dir():
            raise


def layout_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    for manifest in index.get("manifests", []):
        if manifest.get("annotations", {}).get("org.opencontainers.image.ref.name") == _LAYOUT_REF:
            return str(manifest["digest"])
    raise ImageBuildError(f"{layout} has no image tagged {_LAYOUT_REF!r}; remove it to rebuild")


async def push_missing(recipe: ImageRecipe, layout: Path, registry: LocalRegistry) -> list[str]:
    """Pushes the tags the registry lacks or points elsewhere; returns what it pushed."""
    digest = layout_digest(layout)
    pushed = []
    for tag in recipe.tags:
        if await registry.manifest_digest(recipe.repository, tag) == digest:
            continue
        target = f"{registry.host}/{recipe.repository}:{tag}"
        try:
            await run_command(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:{_LAYOUT_REF}",
                    f"docker://{target}",
                ],
                _COMMAND_TIMEOUT,
            )
        except HostRuntimeError as exc:
            raise ImageBuildError(f"pushing {target} failed: {exc}") from exc
        log.info("image pushed", image=target, digest=digest)
        pushed.append(target)
    return pushed


async def _ensure_image(recipe: ImageRecipe, cache_dir: Path, registry: LocalRegistry) -> None:
    layout = await build_layout(recipe, cache_dir)
    await push_missing(recipe, layout, registry)


async def _umoci(*args: str) -> None:
    await run_command(["umoci", *args], _COMMAND_TIMEOUT)


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()

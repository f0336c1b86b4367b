"""The agent's HTTP endpoint: what only the host can answer (container logs), for the API server.

``GET /v1/agent/containers/{container uuid}/logs`` with ``stdout``, ``stderr``, ``timestamps``
(booleans), ``tail`` (a count or ``all``), ``since`` (epoch seconds or an RFC 3339 time) and
``follow``; it answers ``text/plain``, streamed until the container exits when following.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from capsa.compute import labels
from capsa.compute.logs import LogDecoder, LogFilter, LogLine
from capsa.cri import types as cri
from capsa.cri.client import CriClient, CriError
from capsa.log import get_logger

log = get_logger(__name__)

_FOLLOW_POLL_S = 0.2
_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}
_CRI_KEY = web.AppKey("cri", CriClient)


class BadParameter(ValueError):
    pass


def create_agent_app(cri_client: CriClient) -> web.Application:
    app = web.Application()
    app[_CRI_KEY] = cri_client
    app.router.add_get("/v1/agent/containers/{uuid}/logs", _logs)
    app.router.add_get("/healthz", _healthz)
    return app


class AgentServer:
    """Serves the agent app on ``listen`` ("HOST:PORT")."""

    def __init__(self, cri_client: CriClient, listen: str) -> None:
        self._runner = web.AppRunner(create_agent_app(cri_client), access_log=None)
        host, _, port = listen.rpartition(":")
        self._host, self._port = host, int(port)

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _logs(request: web.Request) -> web.StreamResponse:
    uuid = request.match_info["uuid"]
    try:
        log_filter = LogFilter(
            stdout=_flag(request, "stdout", True),
            stderr=_flag(request, "stderr", True),
            timestamps=_flag(request, "timestamps", False),
            since=_since(request.query.get("since", "")),
        )
        tail = _tail(request.query.get("tail", "all"))
        follow = _flag(request, "follow", False)
    except BadParameter as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from exc

    cri_client = request.app[_CRI_KEY]
    try:
        found = await cri_client.list_containers(labels=labels.container_selector(uuid))
        if not found:
            raise web.HTTPNotFound(text=f"container {uuid} has not been created on this host\n")
        latest = max(found, key=lambda c: c.attempt)
        status = await cri_client.container_status(latest.id)
    except CriError as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc.message}\n") from exc

    path = Path(status.log_path)
    decoder = LogDecoder()
    entries, offset = await asyncio.to_thread(_read_entries, path, 0)
    kept: deque[LogLine] = deque(maxlen=tail)
    kept.extend(line for line in decoder.feed(entries) if log_filter.accepts(line))
    first = "".join(log_filter.render(line) for line in kept)
    if not follow:
        return web.Response(text=first, content_type="text/plain")

    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    await response.write(first.encode())
    running = status.state is not cri.ContainerState.EXITED
    while True:
        entries, offset = await asyncio.to_thread(_read_entries, path, offset)
        text = "".join(
            log_filter.render(line) for line in decoder.feed(entries) if log_filter.accepts(line)
        )
        if text:
            await response.write(text.encode())
        elif not running:
            break
        else:
            await asyncio.sleep(_FOLLOW_POLL_S)
            running = await _still_running(cri_client, latest.id)
    await response.write_eof()
    return response


async def _still_running(cri_client: CriClient, container_id: str) -> bool:
    try:
        status = await cri_client.container_status(container_id)
    except CriError:
        return False
    return status.state is not cri.ContainerState.EXITED


def _read_entries(path: Path, offset: int) -> tuple[list[str], int]:
    """Whole entries after ``offset`` and the offset after them (a line being written waits)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    if end == 0:
        return [], offset
    text = data[:end].decode("utf-8", errors="replace")
    return text.splitlines(), offset + end


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadParameter(f"{name}={value!r} is not a boolean (true or false)")


def _tail(value: str) -> int | None:
    if value in ("", "all"):
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise BadParameter(f"tail={value!r} is not 'all' or a count of lines")
    return count


def _since(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadParameter(
            f"since={value!r} is neither epoch seconds nor an RFC 3339 time"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

"""The API's client of the compute agents: container logs live on the host that runs them.

The contract, served by every agent at the URL it registered (``Host.agent_url``)::

    GET {agent_url}/v1/agent/containers/{container_uuid}/logs
        ?stdout=true|false&stderr=true|false&timestamps=true|false
        &tail=all|N&since=<seconds since the epoch, integer or decimal; absent: from the start>
        &follow=true|false

    200 text/plain: the log lines (with follow=true, streamed until the container stops or the
        client goes away)
    404 text/plain: the agent has no such container (not created yet, or already removed)
    other: a failure, with a text/plain reason

The API turns an unreachable agent into 503, a 404 into 409 (the container has no logs yet), and
anything else into 502. The error names the host and the agent's address only to callers who may
see hosts (``name_host``); the API's log always does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from capsa.api.errors import ComputeAgentError, ContainerHostNotUp, InvalidState
from capsa.log import get_logger
from capsa.model.host import Host

log = get_logger(__name__)

_REASON_LIMIT = 500


@dataclass(frozen=True)
class LogOptions:
    stdout: bool = True
    stderr: bool = True
    timestamps: bool = False
    # None: every line.
    tail: int | None = None
    since: float | None = None
    follow: bool = False

    def query(self) -> dict[str, str]:
        query = {
            "stdout": _flag(self.stdout),
            "stderr": _flag(self.stderr),
            "timestamps": _flag(self.timestamps),
            "tail": "all" if self.tail is None else str(self.tail),
            "follow": _flag(self.follow),
        }
        if self.since is not None:
            since = self.since
            query["since"] = str(int(since)) if since.is_integer() else f"{since:.3f}"
        return query


def _flag(value: bool) -> str:
    return "true" if value else "false"


class AgentClient:
    """One connection pool to every agent; ``timeout`` bounds each call (and a stream's start)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
            )
        return self._session

    async def logs(
        self, host: Host, container_uuid: str, options: LogOptions, name_host: bool
    ) -> str:
        """The logs as one text; ``options.follow`` must be False."""
        async with self._open(host, container_uuid, options, name_host) as response:
            try:
                async with asyncio.timeout(self._timeout):
                    return await response.text(errors="replace")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _unreachable(host, container_uuid, exc, name_host) from exc

    @asynccontextmanager
    async def stream_logs(
        self, host: Host, container_uuid: str, options: LogOptions, name_host: bool
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The logs in chunks as the agent sends them; the stream ends quietly if the agent goes."""
        async with self._open(host, container_uuid, options, name_host) as response:
            yield _chunks(response, host, container_uuid)

    @asynccontextmanager
    async def _open(
        self, host: Host, container_uuid: str, options: LogOptions, name_host: bool
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url = f"{host.agent_url.rstrip('/')}/v1/agent/containers/{container_uuid}/logs"
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client().get(url, params=options.query())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(host, container_uuid, exc, name_host) from exc
        try:
            if response.status == 200:
                yield response
                return
            reason = await self._reason(response)
            where = _where(host, name_host)
            if response.status == 404:
                raise InvalidState(
                    f"Container {container_uuid} has no logs on {where} yet: {reason}"
                )
            log.warning(
                "agent failed to read logs",
                host=host.name,
                container=container_uuid,
                status=response.status,
                reason=reason,
            )
            raise ComputeAgentError(
                f"The agent of {where} failed to read the logs of container "
                f"{container_uuid} (HTTP {response.status}): {reason}"
            )
        finally:
            # Closed rather than pooled: a stream left early must not be reused half read.
            response.close()

    async def _reason(self, response: aiohttp.ClientResponse) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                text = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"no reason given ({exc or type(exc).__name__})"
        return text.strip()[:_REASON_LIMIT] or "no reason given"


async def _chunks(
    response: aiohttp.ClientResponse, host: Host, container_uuid: str
) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except aiohttp.ClientError as exc:
        log.warning(
            "log stream from agent ended early", host=host.name, container=container_uuid, error=exc
        )


def _where(host: Host, name_host: bool) -> str:
    return f"host {host.name}" if name_host else "the container's host"


def _unreachable(
    host: Host, container_uuid: str, exc: BaseException, name_host: bool
) -> ContainerHostNotUp:
    timed_out = isinstance(exc, TimeoutError)
    detail = "timed out" if timed_out else str(exc) or type(exc).__name__
    log.warning(
        "agent unreachable",
        host=host.name,
        agent=host.agent_url,
        container=container_uuid,
        error=detail,
    )
    if name_host:
        return ContainerHostNotUp(
            f"The agent of host {host.name} at {host.agent_url} cannot be reached: {detail}"
        )
    # The error's own text names the agent's address.
    what = "timed out" if timed_out else "the connection failed"
    return ContainerHostNotUp(f"The agent of {_where(host, False)} cannot be reached: {what}")

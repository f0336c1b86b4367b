"""Structured logs that say which capsule, container or port a line is about.

Use :func:`get_logger` and pass the subject as keyword fields::

    log = get_logger(__name__)
    log.info("sandbox running", capsule=capsule.uuid, sandbox=sandbox_id)

The text format (for people) renders ``message key=value ...``; the JSON format renders one
object per line with the same keys.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from typing import Any

_FIELDS_ATTR = "capsa_fields"
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class StructLogger:
    """A thin wrapper over :class:`logging.Logger` that takes keyword fields."""

    def __init__(self, logger: logging.Logger, bound: dict[str, Any] | None = None) -> None:
        self._logger = logger
        self._bound = bound or {}

    def bind(self, **fields: Any) -> StructLogger:
        """A logger that adds ``fields`` to every line, for work on one subject."""
        return StructLogger(self._logger, {**self._bound, **fields})

    def _log(self, level: int, msg: str, exc_info: bool, fields: dict[str, Any]) -> None:
        logger = self._logger
        if logger.isEnabledFor(level):
            # Made here, without the caller's file and line, which no format shows: finding
            # them walks the stack, a tenth of a line's time.
            record = logger.makeRecord(
                logger.name,
                level,
                "",
                0,
                msg,
                (),
                sys.exc_info() if exc_info else None,
                extra={_FIELDS_ATTR: {**self._bound, **fields}},
            )
            logger.handle(record)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, False, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, False, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, True, fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(logging.getLogger(name))


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] | None = getattr(record, _FIELDS_ATTR, None)
    if fields is not None:
        return fields
    # A line through the plain logging API: its extra=... fields.
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RESERVED and not key.startswith("_")
    }


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


def _stamp(created: float, msecs: float) -> str:
    """A record's time in UTC, ISO 8601 to the millisecond."""
    return f"{_second(int(created))}.{int(msecs):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    # Lines come in bursts within one second: each formats it once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record.created, record.msecs)} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        fields = _record_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_format_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _stamp(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(
            {
                k: v if isinstance(v, int | float | bool) else str(v)
                for k, v in _record_fields(record).items()
            }
        )
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither format shows a line's thread or process: not looked up for each line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Library chatter that says nothing about capsules.
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""Structured logs that say which capsule, container or port a line is about.

Use :func:`get_logger` and pass the subject as keyword fields::

    log = get_logger(__name__)
    log.info("sandbox running", capsule=capsule.uuid, sandbox=sandbox_id)

The text format (for people) renders ``message key=value ...``; the JSON format renders one
object per line with the same keys.
"""

from __future__ import annotations

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
        if self._logger.isEnabledFor(level):
            merged = {**self._bound, **fields}
            self._logger.log(
                level, msg, exc_info=exc_info, stacklevel=3, extra={_FIELDS_ATTR: merged}
            )

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
    fields: dict[str, Any] = dict(getattr(record, _FIELDS_ATTR, {}))
    # Fields passed through the plain logging API (extra=...) count too.
    for key, value in vars(record).items():
        if key not in _RESERVED and key != _FIELDS_ATTR and not key.startswith("_"):
            fields.setdefault(key, value)
    return fields


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        fields = _record_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_format_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        data: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
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
    # Library chatter that says nothing about capsules.
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

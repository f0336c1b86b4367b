from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from capsa.log import get_logger, setup_logging

_STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """What the logs set up in the test write (to stderr otherwise)."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def _setup(level: str, fmt: str, stream: io.StringIO) -> None:
    setup_logging(level, fmt)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)


def test_a_text_line_says_its_subject_as_fields(stderr: io.StringIO) -> None:
    _setup("INFO", "text", stderr)
    log = get_logger("capsa.test").bind(capsule="c-1")
    log.info("port bound", port="p-1", netns="/run/netns/a b", ifname="")
    log.debug("not shown", port="p-2")
    (line,) = stderr.getvalue().splitlines()
    assert re.fullmatch(
        _STAMP + r' INFO    capsa\.test: port bound capsule=c-1 port=p-1 netns="/run/netns/a b" '
        r'ifname=""',
        line,
    ), line


def test_a_json_line_is_one_object_with_the_fields(stderr: io.StringIO) -> None:
    _setup("DEBUG", "json", stderr)
    get_logger("capsa.test").warning("ADD waits", capsule="c-1", attempts=3)
    # Fields given through the plain logging API count too.
    logging.getLogger("other").info("plain", extra={"port": "p-1"})
    first, second = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert re.fullmatch(_STAMP, first.pop("time"))
    assert first == {
        "level": "WARNING",
        "logger": "capsa.test",
        "msg": "ADD waits",
        "capsule": "c-1",
        "attempts": 3,
    }
    assert second["msg"] == "plain" and second["port"] == "p-1"


def test_an_exception_line_carries_the_traceback(stderr: io.StringIO) -> None:
    _setup("INFO", "text", stderr)
    try:
        raise ValueError("bad port")
    except ValueError:
        get_logger("capsa.test").exception("CNI ADD failed unexpectedly", capsule="c-1")
    text = stderr.getvalue()
    assert "CNI ADD failed unexpectedly capsule=c-1\nTraceback" in text
    assert text.rstrip().endswith("ValueError: bad port")

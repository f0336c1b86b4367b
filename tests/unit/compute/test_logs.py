from __future__ import annotations

from datetime import UTC, datetime

import pytest

from capsa.compute.logs import LogDecoder, LogFilter, LogLine, parse_timestamp
from capsa.compute.server import BadParameter, _since, _tail

ENTRIES = [
    "2026-11-25T10:00:00.000000001Z stdout F first\n",
    "2026-11-25T10:00:01.5Z stderr F oops\n",
    "2026-11-25T10:00:02.000000000Z stdout P a very ",
    "2026-11-25T10:00:02.100000000Z stderr F interleaved\n",
    "2026-11-25T10:00:02.200000000Z stdout F long line\n",
    "2026-11-25T10:00:03Z stdout F \n",
]


def test_partial_entries_join_per_stream() -> None:
    lines = list(LogDecoder().feed(ENTRIES))
    assert [(line.stream, line.text) for line in lines] == [
        ("stdout", "first"),
        ("stderr", "oops"),
        ("stderr", "interleaved"),
        ("stdout", "a very long line"),
        ("stdout", ""),
    ]


def test_a_partial_entry_waits_for_its_end_across_feeds() -> None:
    decoder = LogDecoder()
    assert list(decoder.feed(ENTRIES[2:3])) == []
    (line,) = decoder.feed([ENTRIES[4]])
    assert line.text == "a very long line"


@pytest.mark.parametrize(
    ("log_filter", "texts"),
    [
        (LogFilter(), ["first", "oops", "interleaved", "a very long line", ""]),
        (LogFilter(stderr=False), ["first", "a very long line", ""]),
        (LogFilter(stdout=False), ["oops", "interleaved"]),
        (
            LogFilter(since=datetime(2026, 11, 25, 10, 0, 2, 150000, tzinfo=UTC)),
            ["a very long line", ""],
        ),
    ],
)
def test_filters(log_filter: LogFilter, texts: list[str]) -> None:
    accepted = [line.text for line in LogDecoder().feed(ENTRIES) if log_filter.accepts(line)]
    assert accepted == texts


def test_rendering_with_and_without_timestamps() -> None:
    line = LogLine("2026-11-25T10:00:00.5Z", "stdout", "hi")
    assert LogFilter().render(line) == "hi\n"
    assert LogFilter(timestamps=True).render(line) == "2026-11-25T10:00:00.5Z hi\n"


def test_timestamps_keep_microseconds() -> None:
    assert parse_timestamp("2026-11-25T10:00:00.123456789Z") == datetime(
        2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC
    )
    assert parse_timestamp("2026-11-25T10:00:00Z") == datetime(2026, 11, 25, 10, tzinfo=UTC)


def test_tail_and_since_parameters() -> None:
    assert _tail("all") is None and _tail("") is None and _tail("3") == 3
    with pytest.raises(BadParameter, match="tail"):
        _tail("-1")
    assert _since("") is None
    assert _since("1764064800") == datetime(2025, 11, 25, 10, 0, tzinfo=UTC)
    assert _since("2026-11-25T10:00:00Z") == datetime(2026, 11, 25, 10, tzinfo=UTC)
    with pytest.raises(BadParameter, match="since"):
        _since("yesterday")

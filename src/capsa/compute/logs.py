"""Reading container logs in the CRI format that containerd writes.

Each line of a log file is ``<RFC3339Nano UTC> <stdout|stderr> <F|P> <text>``; ``P`` marks a part of
a longer line that continues on the next entry of the same stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class LogLine:
    timestamp: str
    stream: str
    text: str

    @property
    def time(self) -> datetime:
        return parse_timestamp(self.timestamp)


@dataclass(frozen=True)
class LogFilter:
    stdout: bool = True
    stderr: bool = True
    # Only lines at or after this time.
    since: datetime | None = None
    timestamps: bool = False

    def accepts(self, line: LogLine) -> bool:
        if line.stream == "stdout" and not self.stdout:
            return False
        if line.stream == "stderr" and not self.stderr:
            return False
        return self.since is None or line.time >= self.since

    def render(self, line: LogLine) -> str:
        return f"{line.timestamp} {line.text}\n" if self.timestamps else f"{line.text}\n"


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 with up to nanoseconds (Python keeps microseconds)."""
    head, _, rest = text.partition(".")
    if rest:
        digits = rest.rstrip("Z").split("+")[0].split("-")[0]
        head = f"{head}.{digits[:6].ljust(6, '0')}"
        return datetime.strptime(head, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    return datetime.strptime(text.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


class LogDecoder:
    """Turns raw CRI log entries into whole lines, joining partial entries per stream."""

    def __init__(self) -> None:
        self._partial: dict[str, str] = {}

    def feed(self, entries: Iterable[str]) -> Iterator[LogLine]:
        for entry in entries:
            parts = entry.rstrip("\n").split(" ", 3)
            if len(parts) < 3:
                continue
            timestamp, stream, tag = parts[0], parts[1], parts[2]
            text = parts[3] if len(parts) == 4 else ""
            if tag == "P":
                self._partial[stream] = self._partial.get(stream, "") + text
                continue
            yield LogLine(timestamp, stream, self._partial.pop(stream, "") + text)

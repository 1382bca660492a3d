"""Counts what the NATS server refused, from its log, for the fleet API.

nats-server enforces the cars' credentials and permissions itself and reports a refusal only
in its log (permission violations raise no system event): "authentication error" for a
connection without credentials, with an unknown, revoked or forged key, and "Publish
Violation" / "Subscription Violation" with the offending key and subject. A replica that can
read the server's log (the embedded fleet's can; in a deployment, a log shipper's copy) follows
it here and counts each kind, and which car (by key) did it. Parsing is pure (`parse_line`);
`NatsLogWatch.poll` reads what was appended since the last call.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["NatsLogWatch", "parse_line"]

log = logging.getLogger(__name__)

_VIOLATION = re.compile(
    r'nkey:(?P<nkey>U[A-Z2-7]{55})" - (?P<kind>Publish|Subscription) Violation - '
    r'Subject "(?P<subject>[^"]*)"'
)
_AUTH_ERROR = re.compile(r"\[ERR\] (?P<peer>\S+) - \S+ - authentication error")
_MAX_READ = 1 << 20


def parse_line(line: str) -> tuple[str, str | None, str] | None:
    """(kind, nkey or None, detail) of a refusal line, or None for any other line."""
    if (match := _VIOLATION.search(line)) is not None:
        kind = "publish_violation" if match["kind"] == "Publish" else "subscribe_violation"
        return kind, match["nkey"], match["subject"]
    if (match := _AUTH_ERROR.search(line)) is not None:
        return "authentication_error", None, match["peer"]
    return None


class NatsLogWatch:
    """Follows nats-server log files and counts refusals."""

    def __init__(self, paths: Sequence[Path], vehicle_of: Callable[[str], str | None]) -> None:
        self.paths = list(paths)
        self.vehicle_of = vehicle_of
        """Maps a car's public nkey to its vehicle id (None: not an enrolled car)."""
        self.refused: Counter[str] = Counter()
        self.by_vehicle: Counter[str] = Counter()
        self._offsets = {path: self._end(path) for path in self.paths}  # from now on

    @staticmethod
    def _end(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def poll(self) -> int:
        """Read and count what the logs gained since the last poll; returns refusals seen."""
        seen = 0
        for path in self.paths:
            try:
                size = path.stat().st_size
                offset = self._offsets[path] if self._offsets[path] <= size else 0  # rotated
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(_MAX_READ)
            except OSError:
                continue
            cut = data.rfind(b"\n") + 1  # only whole lines; the rest comes next time
            self._offsets[path] = offset + cut
            for raw in data[:cut].splitlines():
                found = parse_line(raw.decode("utf-8", "replace"))
                if found is None:
                    continue
                kind, nkey, detail = found
                self.refused[kind] += 1
                vehicle = self.vehicle_of(nkey) if nkey else None
                if vehicle is not None:
                    self.by_vehicle[vehicle] += 1
                log.warning(
                    "NATS refused %s: %s (%s)", kind, vehicle or nkey or "unauthenticated", detail
                )
                seen += 1
        return seen

    def snapshot(self) -> dict[str, object]:
        return {
            "nats_refused": dict(self.refused),
            "nats_refused_by_vehicle": dict(self.by_vehicle),
        }

"""Energy metering in the car: what compute cost, per unit of work and per local day.

Each model run is metered as power × time: the chip's reported power when the car reports it
(the VSS overlay's ``Health.Resources.Power``), otherwise the hardware's rated power at full
load, which over-counts rather than under-counts. The per-day total is counted in the owner's
local day, because that is the day the owner's cap is written in, and is kept in a small file
so a restarted agent does not forget what it already used today.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import date
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["JOULES_PER_KWH", "EnergyMeter"]

JOULES_PER_KWH = 3.6e6


class EnergyMeter:
    """Joules used today (local day) and per lease; thread-safe."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._day: date | None = None
        self._today_j = 0.0
        self._by_lease: dict[str, float] = {}
        self._total_j = 0.0
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
            self._day = date.fromisoformat(saved["day"])
            self._today_j = float(saved["today_j"])
            if self._today_j < 0:
                raise ValueError("negative energy")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Refusing to work for ever would be worse than a day's cap counted from zero, and
            # the state-of-charge floor still protects the battery; but say so.
            log.warning("energy meter file %s unreadable (%s); starting from 0", path, exc)
            self._day, self._today_j = None, 0.0

    def today_kwh(self, day: date) -> float:
        with self._lock:
            return (self._today_j if self._day == day else 0.0) / JOULES_PER_KWH

    def record(self, joules: float, day: date, lease_id: str | None = None) -> None:
        """Add ``joules`` spent on ``day`` (the owner's local date), for ``lease_id`` if any."""
        if joules < 0:
            raise ValueError("energy cannot be negative")
        with self._lock:
            if self._day != day:
                self._day, self._today_j = day, 0.0
            self._today_j += joules
            self._total_j += joules
            if lease_id is not None:
                self._by_lease[lease_id] = self._by_lease.get(lease_id, 0.0) + joules

    def take_lease(self, lease_id: str) -> float:
        """Joules recorded for ``lease_id`` since the last take (reported once, then reset)."""
        with self._lock:
            return self._by_lease.pop(lease_id, 0.0)

    @property
    def total_j(self) -> float:
        with self._lock:
            return self._total_j

    def save(self) -> None:
        if self._path is None:
            return
        with self._lock:
            payload = {
                "day": self._day.isoformat() if self._day else None,
                "today_j": self._today_j,
            }
        if payload["day"] is None:
            return
        tmp = self._path.with_suffix(".tmp")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self._path)

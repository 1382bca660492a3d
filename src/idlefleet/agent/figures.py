"""What the car did since its last acknowledged heartbeat, for the operators' metrics.

The compute gate adds every model run (its seconds, its energy, how long it took to stop if it
was told to) and every preemption; the heartbeat takes the sum and sends it
(:class:`~idlefleet.protocol.messages.CarFigures`), and puts it back if the heartbeat was not
acknowledged, so a lost heartbeat loses nothing (one whose acknowledgement alone was lost is
counted twice: these are metrics, the ledger does not read them). Nothing happened, nothing is
sent: an idle car's heartbeats stay as small as before.
"""

from __future__ import annotations

import threading
from collections import deque

from idlefleet.protocol.messages import CarFigures

MAX_STOPS = 64
"""Stop times kept between heartbeats (the latest; the wire takes at most this many)."""


class Figures:
    """Thread-safe: runs end on compute threads, heartbeats take the sums on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs = 0
        self._compute_s = 0.0
        self._energy_j = 0.0
        self._preemptions = 0
        self._stops: deque[float] = deque(maxlen=MAX_STOPS)

    def ran(self, seconds: float, joules: float, stop_s: float | None = None) -> None:
        """A model run ended after ``seconds``, using ``joules``; ``stop_s``: it was told to
        stop, and took this long to."""
        with self._lock:
            self._runs += 1
            self._compute_s += max(0.0, seconds)
            self._energy_j += max(0.0, joules)
            if stop_s is not None:
                self._stops.append(min(max(0.0, stop_s), 3600.0))

    def preempted(self) -> None:
        with self._lock:
            self._preemptions += 1

    def take(self) -> CarFigures | None:
        """The figures since the last take (None if nothing happened), and start again."""
        with self._lock:
            if not (self._runs or self._preemptions):
                return None
            figures = CarFigures(
                runs=min(self._runs, 10_000_000),
                compute_s=min(self._compute_s, 1e7),
                energy_j=min(self._energy_j, 1e10),
                preemptions=min(self._preemptions, 1_000_000),
                stop_s=list(self._stops),
            )
            self._runs = self._preemptions = 0
            self._compute_s = self._energy_j = 0.0
            self._stops.clear()
            return figures

    def put_back(self, figures: CarFigures) -> None:
        """A heartbeat carrying ``figures`` was not acknowledged: they go with the next."""
        with self._lock:
            self._runs += figures.runs
            self._compute_s += figures.compute_s
            self._energy_j += figures.energy_j
            self._preemptions += figures.preemptions
            recent = list(self._stops)
            self._stops.clear()
            self._stops.extend([*figures.stop_s, *recent])

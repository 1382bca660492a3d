"""The one interface every vehicle-state source implements.

A source reads the car (a replayed trace, a KUKSA databroker) and pushes `StateReading`s to a
single listener **from its own thread**, as soon as something changes. Pushing from the
source's thread, rather than through the agent's event loop, is what lets a gear change stop
the model within milliseconds even while the loop is busy sending results.

Contract for implementations:

* `start` returns quickly; readings then arrive on the source's thread until `stop`.
* The first reading is delivered as soon as the source has read the car once; until then the
  agent treats the car as unreadable (no work).
* Invalid values and a lost connection are delivered as readings with ``error`` set (see
  `StateAssembler`), never swallowed and never raised into the listener's caller.
* `now` is the source's clock in seconds since the epoch. It is wall time for a real car and
  trace time (possibly compressed) for a replayed trace; the policy guard judges hours,
  departure and hysteresis by it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from idlefleet.agent.vehicle_state import StateReading

StateListener = Callable[[StateReading], object]
"""Called on the source's thread for every reading; it must return quickly and not raise."""


class StateSource(ABC):
    """Reads a car's VSS signals and pushes readings to one listener."""

    @abstractmethod
    def start(self, listener: StateListener) -> None:
        """Begin delivering readings to ``listener`` (on the source's own thread)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop delivering readings and release the source's thread and connections."""

    def now(self) -> float:
        """The source's clock (seconds since the epoch)."""
        return time.time()

"""An owner's policy for their car, and the vocabularies of workload purposes and data regions.

The policy is set by the owner (fleet API or CLI), stored by the coordinator with a version,
and sent to the car, where the policy guard enforces it. It is one typed definition because it
crosses both wires (HTTP from the owner, NATS to the car) and is validated the same way on each.
Defaults are the cautious ones: a car is opted out until its owner opts in, and computes only
while charging and above half charge.

Every unit of work carries one purpose (what the customer uses the results for) and one data
region (where the customer's data may be processed; ``global`` means no restriction). A car
takes a unit only if its owner allows both.
"""

from __future__ import annotations

import re
from datetime import datetime, time
from typing import Annotated, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from idlefleet.protocol.messages import WireModel

__all__ = [
    "DATA_REGIONS",
    "DEFAULT_DATA_REGION",
    "DEFAULT_PURPOSE",
    "PURPOSES",
    "DataRegion",
    "HourWindow",
    "OwnerPolicy",
    "PolicyRequest",
    "PolicyUpdate",
    "Purpose",
    "parse_hour_window",
]

Purpose = Literal[
    "general", "research", "education", "healthcare", "nonprofit", "government", "advertising"
]
"""What a customer uses the results for. ``general``: ordinary commercial inference."""
PURPOSES: tuple[Purpose, ...] = get_args(Purpose)
DEFAULT_PURPOSE: Purpose = "general"

DataRegion = Literal["global", "eu", "uk", "us", "ca", "apac", "latam", "mea"]
"""Where a unit's data may be processed; ``global``: the customer set no restriction."""
DATA_REGIONS: tuple[DataRegion, ...] = get_args(DataRegion)
DEFAULT_DATA_REGION: DataRegion = "global"

_HHMM = r"([01]\d|2[0-3]):([0-5]\d)"
_WINDOW = re.compile(rf"^{_HHMM}-{_HHMM}$")
_TIME = re.compile(rf"^{_HHMM}$")


def parse_hour_window(text: str) -> tuple[time, time]:
    """``"22:00-07:00"`` → (22:00, 07:00). A window may cross midnight; start == end is refused."""
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError(f"hour window {text!r} must look like 22:00-07:00 (24-hour HH:MM-HH:MM)")
    start = time(int(match[1]), int(match[2]))
    end = time(int(match[3]), int(match[4]))
    if start == end:
        raise ValueError(f"hour window {text!r} is empty; leave allowed_hours empty for any time")
    return start, end


HourWindow = Annotated[str, Field(description="Local time window HH:MM-HH:MM, may cross midnight")]


class OwnerPolicy(WireModel):
    """What the owner allows their car to do. Every field has a cautious default."""

    opted_in: bool = False
    """The owner has agreed that the car computes for others. Off until the owner opts in."""
    charging_only: bool = True
    """Compute only while the car is charging."""
    soc_floor_percent: Annotated[float, Field(ge=0, le=100)] = 50.0
    """Never compute at or below this state of charge, so compute never eats the owner's range."""
    max_battery_temp_c: Annotated[float, Field(ge=-40, le=80)] = 45.0
    """Stop above this traction-battery temperature."""
    max_chip_temp_c: Annotated[float, Field(ge=0, le=150)] = 90.0
    """Stop above this inference-chip temperature."""
    allowed_hours: Annotated[list[HourWindow], Field(max_length=24)] = Field(default_factory=list)
    """Local time windows in which the car may compute; empty means any time."""
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    """The owner's IANA time zone (e.g. ``Europe/Berlin``); hours and days are counted in it."""
    daily_energy_cap_kwh: Annotated[float, Field(ge=0, le=1000)] | None = 10.0
    """Most energy compute may use per local day; None for no cap."""
    departure_time: str | None = None
    """Expected daily departure, local ``HH:MM``; compute stops ``stop_before_departure_min``
    before it (and may resume after it, if the car is still parked)."""
    stop_before_departure_min: Annotated[int, Field(ge=0, le=720)] = 30
    purposes: Annotated[list[Purpose], Field(min_length=1)] = Field(
        default_factory=lambda: list(PURPOSES)
    )
    """Workload purposes the owner allows."""
    data_regions: Annotated[list[DataRegion], Field(min_length=1)] = Field(
        default_factory=lambda: list(DATA_REGIONS)
    )
    """Data regions whose work the owner allows on the car."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        # OSError: a name of one of tzdata's folders ("America") is opened as a file.
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as Europe/Berlin or UTC"
            ) from None
        return value

    @field_validator("allowed_hours")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for window in value:
            parse_hour_window(window)
        return value

    @field_validator("departure_time")
    @classmethod
    def _departure(cls, value: str | None) -> str | None:
        if value is not None and not _TIME.match(value):
            raise ValueError(f"departure_time {value!r} must be local time HH:MM (24-hour)")
        return value

    @field_validator("purposes", "data_regions")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat entries")
        return value

    # -- derived views (used by the guard; pure) --------------------------------------------
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local(self, epoch_s: float) -> datetime:
        """``epoch_s`` as the owner's local time."""
        return datetime.fromtimestamp(epoch_s, self.zone())

    def hour_windows(self) -> list[tuple[time, time]]:
        return [parse_hour_window(w) for w in self.allowed_hours]

    def allows_unit(self, purpose: str, data_region: str) -> bool:
        """Whether a unit with this purpose and data region may run on the car."""
        return self.opted_in and purpose in self.purposes and data_region in self.data_regions


class PolicyRequest(WireModel):
    """A car asks for its owner's current policy (uplink ``policy``)."""


class PolicyUpdate(WireModel):
    """The owner's policy for one car, as the coordinator holds it.

    The reply to `PolicyRequest`, and the push on downlink ``policy`` when the owner changes
    it. ``version`` 0 means the owner has never set one: the car uses the default (opted out).
    """

    version: Annotated[int, Field(ge=0)]
    policy: OwnerPolicy

"""Every assumption of the fleet model, as one validated, typed parameter set.

The simulator answers questions nobody can test on a real fleet, so its answers are only as good
as its assumptions; they are therefore all here, named, with units, defaults and the reason for
each default, and every one can be changed from a JSON file (``idlefleet sim --params``) or a
flag. Validation happens once, here, with pydantic: a share above 1, a negative fleet, an empty
week or hardware shares that do not add up are refused with a message naming the field.

Defaults describe a plausible fleet today, calibrated so that cars are parked ~95% of the time
and driven ~1 hour per vehicle-day (US NHTS 2017: 2.9 trips and ~60 minutes per vehicle-day).
Hardware figures are public estimates, not vendor specifications: change them with
``--hardware``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from idlefleet.protocol.policy import OwnerPolicy

__all__ = [
    "ChargingParams",
    "EconomicsParams",
    "HardwareClass",
    "ParamsError",
    "PolicyProfile",
    "Region",
    "SimParams",
    "ThermalParams",
    "TravelParams",
    "load_params",
]

Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Hour = Annotated[float, Field(ge=0, le=24, allow_inf_nan=False)]


class ParamsError(ValueError):
    """Parameters the model cannot run with; the message names each bad field and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_shares(items: tuple[Any, ...], what: str) -> None:
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique, got {names}")
    total = math.fsum(item.share for item in items)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"{what} shares must add up to 1, got {total:g}")


class HardwareClass(_Model):
    """One kind of in-car computer. TOPS are dense INT8 tera-operations per second, peak."""

    name: Annotated[str, Field(min_length=1, max_length=32)]
    share: Share
    """Fraction of the fleet with this computer."""
    int8_tops: Positive
    """Peak dense INT8 TOPS of the whole computer."""
    compute_kw: Positive
    """What the whole car draws while computing: the computer, its cooling pump and fans, the
    DC-DC converter and the awake low-voltage systems (not the chip alone)."""
    memory_gib: Positive
    sustained_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    """Sustained ÷ peak throughput at moderate ambient temperature (clocks under a steady load)."""


class Region(_Model):
    """Where cars are: local time and climate (one representative week, no seasons)."""

    name: Annotated[str, Field(min_length=1, max_length=32)]
    share: Share
    utc_offset_h: Annotated[float, Field(ge=-12, le=14)]
    ambient_mean_c: Annotated[float, Field(ge=-50, le=50)] = 15.0
    ambient_swing_c: Annotated[float, Field(ge=0, le=25)] = 6.0
    """Half the daily peak-to-peak swing; the warmest hour is 15:00 local."""


class PolicyProfile(_Model):
    """A share of owners who set the same policy; opt-in is drawn separately (``opt_in_rate``).

    The policy is the real `OwnerPolicy` the car's guard enforces. The model evaluates it in the
    car's local time (its region's UTC offset), so the policy's own ``timezone`` is not used, and
    its ``opted_in`` is ignored.
    """

    name: Annotated[str, Field(min_length=1, max_length=32)]
    share: Share
    policy: OwnerPolicy


class TravelParams(_Model):
    """Trip chains. A day runs from local midnight to midnight and starts and ends at home."""

    commuter_share: Share = 0.55
    work_day_prob: Share = 0.85
    """Chance a commuter drives to work on a weekday."""
    weekend_work_prob: Share = 0.10
    stay_home_weekday: Share = 0.12
    """Chance a non-working vehicle-day has no trip at all."""
    stay_home_weekend: Share = 0.18
    commute_depart_h: Hour = 7.75
    commute_depart_sd_h: NonNegative = 1.0
    work_dwell_h: Hour = 8.5
    work_dwell_sd_h: NonNegative = 1.0
    evening_tour_prob: Share = 0.45
    errand_depart_h: Hour = 10.5
    errand_depart_sd_h: NonNegative = 2.0
    tours_1_2_3: tuple[Share, Share, Share] = (0.45, 0.38, 0.17)
    """On a day without work: chances of one, two or three home-based errand tours."""
    errand_dwell_median_min: Positive = 45.0
    errand_dwell_sigma: NonNegative = 0.9
    home_gap_mean_min: Positive = 120.0
    commute_trip_median_min: Positive = 22.0
    commute_trip_sigma: NonNegative = 0.5
    errand_trip_median_min: Positive = 14.0
    errand_trip_sigma: NonNegative = 0.7
    speed_kmh: Positive = 42.0
    """Average speed including stops, so trip energy is duration × speed × consumption."""
    kwh_per_km: Positive = 0.17

    @model_validator(mode="after")
    def _tours(self) -> TravelParams:
        if not math.isclose(math.fsum(self.tours_1_2_3), 1.0, abs_tol=1e-6):
            raise ValueError(f"tours_1_2_3 must add up to 1, got {list(self.tours_1_2_3)}")
        return self


class ChargingParams(_Model):
    """Where cars plug in, how fast they charge, and the battery."""

    home_charger_share: Share = 0.75
    home_charger_kw: Positive = 7.2
    plug_habit: Share = 0.5
    """Chance an owner with a home charger plugs in on arriving home whatever the charge."""
    plug_below_soc: Share = 0.7
    """Owners with a home charger always plug in below this state of charge."""
    work_charger_share: Share = 0.2
    """Fraction of commuters with a charger at work."""
    work_plug_prob: Share = 0.8
    work_charger_kw: Positive = 7.2
    public_plug_prob: Share = 0.05
    public_charger_kw: Positive = 11.0
    fast_charger_kw: Positive = 120.0
    fast_below_soc: Share = 0.25
    """At a public stop below this charge, the driver uses a fast charger (``fast_prob``)."""
    fast_prob: Share = 0.7
    charge_limit_soc: Annotated[float, Field(gt=0, le=1)] = 0.8
    reserve_soc: Share = 0.1
    """A trip that would end below this charge gets an en-route fast charge to the limit."""
    efficiency: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Grid (AC) to battery (DC); the car's loads while plugged in are fed through it too."""
    battery_kwh: tuple[Positive, ...] = (60.0, 75.0, 100.0)
    battery_share: tuple[Share, ...] = (0.3, 0.5, 0.2)
    initial_soc: tuple[Share, Share] = (0.5, 0.9)

    @model_validator(mode="after")
    def _batteries(self) -> ChargingParams:
        if len(self.battery_kwh) != len(self.battery_share) or not self.battery_kwh:
            raise ValueError("battery_kwh and battery_share must be non-empty and the same length")
        if not math.isclose(math.fsum(self.battery_share), 1.0, abs_tol=1e-6):
            raise ValueError(f"battery_share must add up to 1, got {list(self.battery_share)}")
        if self.initial_soc[0] > self.initial_soc[1]:
            raise ValueError(f"initial_soc must be (low, high), got {list(self.initial_soc)}")
        return self


class ThermalParams(_Model):
    """How heat limits compute: the guard's temperature rules, and throttling."""

    battery_rise_c: float = 5.0
    """A parked car's battery temperature above ambient."""
    chip_idle_rise_c: float = 15.0
    """The inference chip above ambient before it starts (the guard checks it then; under load
    the chip throttles itself to stay under its limit, which the derating below models)."""
    derate_start_c: float = 30.0
    derate_per_c: Annotated[float, Field(ge=0, le=1)] = 0.02
    """Sustained throughput lost per °C of daily mean ambient above ``derate_start_c``."""
    min_derate: Annotated[float, Field(gt=0, le=1)] = 0.5
    day_sd_c: NonNegative = 3.0
    """Day-to-day spread of a region's daily mean temperature."""


class EconomicsParams(_Model):
    """What compute sells for and what the owner gets."""

    price_usd_per_1k_tops_hour: NonNegative = 0.30
    """Customer price per 1,000 sustained INT8 TOPS for one hour (an NVIDIA L4, ~480 dense INT8
    TOPS, rents for ~$0.50-0.80 an hour; idle car compute must undercut it)."""
    revenue_share: Share = 0.7
    """The owner's share of the customer price."""
    electricity_usd_per_kwh: NonNegative = 0.15
    utilization: Share = 1.0
    """Fraction of allowed compute time that has paid work (1: an upper bound, every minute
    sold). Compute energy scales with it too."""


def _default_hardware() -> tuple[HardwareClass, ...]:
    return (
        HardwareClass(name="HW3", share=0.35, int8_tops=144, compute_kw=0.25, memory_gib=8),
        HardwareClass(name="HW4", share=0.55, int8_tops=500, compute_kw=0.4, memory_gib=16),
        HardwareClass(name="AI5", share=0.10, int8_tops=5000, compute_kw=1.0, memory_gib=64),
    )


def _default_regions() -> tuple[Region, ...]:
    return (
        Region(name="us-west", share=0.15, utc_offset_h=-8, ambient_mean_c=17, ambient_swing_c=7),
        Region(name="us-east", share=0.20, utc_offset_h=-5, ambient_mean_c=13, ambient_swing_c=6),
        Region(name="europe", share=0.30, utc_offset_h=1, ambient_mean_c=11, ambient_swing_c=5),
        Region(name="china", share=0.25, utc_offset_h=8, ambient_mean_c=16, ambient_swing_c=5),
        Region(name="australia", share=0.10, utc_offset_h=10, ambient_mean_c=19, ambient_swing_c=6),
    )


def _default_policies() -> tuple[PolicyProfile, ...]:
    return (
        PolicyProfile(name="cautious", share=0.5, policy=OwnerPolicy()),
        PolicyProfile(
            name="overnight",
            share=0.3,
            policy=OwnerPolicy(allowed_hours=["22:00-06:00"]),
        ),
        PolicyProfile(
            name="generous",
            share=0.2,
            policy=OwnerPolicy(charging_only=False, soc_floor_percent=40, daily_energy_cap_kwh=20),
        ),
    )


class SimParams(_Model):
    """The whole fleet model. ``vehicles`` × ``days`` vehicle-days, reproducible from ``seed``."""

    vehicles: Annotated[int, Field(ge=1, le=10_000_000_000)] = 100_000
    days: Annotated[int, Field(ge=1, le=366)] = 7
    seed: Annotated[int, Field(ge=0)] = 0
    start_weekday: Annotated[int, Field(ge=0, le=6)] = 0
    """Day 0's weekday (0 Monday … 6 Sunday); the series wraps the simulated days round."""
    opt_in_rate: Share = 0.3
    resume_after_min: Annotated[float, Field(ge=0, le=1440)] = 5.0
    """The guard's hysteresis (the agent's default is 300 s)."""
    hardware: tuple[HardwareClass, ...] = Field(default_factory=_default_hardware, min_length=1)
    regions: tuple[Region, ...] = Field(default_factory=_default_regions, min_length=1)
    policies: tuple[PolicyProfile, ...] = Field(default_factory=_default_policies, min_length=1)
    travel: TravelParams = Field(default_factory=TravelParams)
    charging: ChargingParams = Field(default_factory=ChargingParams)
    thermal: ThermalParams = Field(default_factory=ThermalParams)
    economics: EconomicsParams = Field(default_factory=EconomicsParams)
    bin_minutes: Annotated[int, Field(ge=1, le=1440)] = 15
    """Resolution of the time series."""
    chunk_vehicles: Annotated[int, Field(ge=1, le=5_000_000)] = 50_000
    """Vehicles simulated at once; bounds memory whatever the fleet size."""

    @model_validator(mode="after")
    def _consistent(self) -> SimParams:
        _check_shares(self.hardware, "hardware")
        _check_shares(self.regions, "region")
        _check_shares(self.policies, "policy profile")
        if 1440 % self.bin_minutes:
            raise ValueError(f"bin_minutes must divide 1440, got {self.bin_minutes}")
        return self

    @classmethod
    def build(cls, **fields: Any) -> SimParams:
        """Validate ``fields``; `ParamsError` lists every problem as ``field: reason``."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ParamsError(_explain(exc)) from None

    def replace(self, **fields: Any) -> SimParams:
        """A validated copy with ``fields`` changed."""
        return SimParams.build(**{**self.model_dump(), **fields})


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "parameters"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(
            f"{where}: {message}" + (f" (got {error['input']!r})" if _short(error) else "")
        )
    return "; ".join(parts)


def _short(error: Any) -> bool:
    value = error.get("input")
    return isinstance(value, int | float | str | bool) and len(repr(value)) <= 40


def load_params(path: str | Path, **overrides: Any) -> SimParams:
    """Parameters from a JSON file (any subset of `SimParams`' fields), then ``overrides``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read parameters: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{path}: bad JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a JSON object of parameters")
    try:
        return SimParams.build(**{**data, **overrides})
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None

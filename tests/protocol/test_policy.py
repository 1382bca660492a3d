"""The owner policy: cautious defaults and clear refusals of impossible values."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from idlefleet.protocol.policy import DATA_REGIONS, PURPOSES, OwnerPolicy, PolicyUpdate


def test_defaults_are_cautious() -> None:
    policy = OwnerPolicy()
    assert policy.opted_in is False and policy.charging_only is True
    assert policy.soc_floor_percent == 50.0
    assert set(policy.purposes) == set(PURPOSES) and set(policy.data_regions) == set(DATA_REGIONS)
    assert not policy.allows_unit("general", "global")  # opted out


@pytest.mark.parametrize(
    ("fields", "where", "words"),
    [
        ({"soc_floor_percent": 140}, "soc_floor_percent", "less than or equal to 100"),
        ({"daily_energy_cap_kwh": -1}, "daily_energy_cap_kwh", "greater than or equal to 0"),
        ({"purposes": ["mining"]}, "purposes", "'general'"),
        ({"purposes": []}, "purposes", "at least 1"),
        ({"purposes": ["research", "research"]}, "purposes", "must not repeat"),
        ({"data_regions": ["mars"]}, "data_regions", "'eu'"),
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
        # A folder of the zone database: ZoneInfo raised IsADirectoryError (a 500 at the API).
        ({"timezone": "America"}, "timezone", "unknown time zone"),
        ({"allowed_hours": ["22-7"]}, "allowed_hours", "HH:MM-HH:MM"),
        ({"allowed_hours": ["08:00-08:00"]}, "allowed_hours", "empty"),
        ({"departure_time": "7:30am"}, "departure_time", "HH:MM"),
        ({"stop_before_departure_min": -5}, "stop_before_departure_min", "greater than"),
        ({"opted_in": "yes please"}, "opted_in", "boolean"),
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_impossible_policies_are_refused_with_the_field_and_the_reason(
    fields: dict[str, Any], where: str, words: str
) -> None:
    with pytest.raises(ValidationError) as excinfo:
        OwnerPolicy(**fields)
    error = excinfo.value.errors()[0]
    assert error["loc"][0] == where
    assert words in error["msg"]


def test_units_need_both_purpose_and_region_allowed() -> None:
    policy = OwnerPolicy(opted_in=True, purposes=["research"], data_regions=["eu", "global"])
    assert policy.allows_unit("research", "eu")
    assert not policy.allows_unit("advertising", "eu")
    assert not policy.allows_unit("research", "us")


def test_policy_update_round_trips_as_json() -> None:
    update = PolicyUpdate(version=3, policy=OwnerPolicy(opted_in=True, timezone="Europe/Berlin"))
    assert PolicyUpdate.model_validate_json(update.model_dump_json()) == update

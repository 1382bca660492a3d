"""Fleet-model parameters: impossible values are refused with the field and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlefleet.sim.params import ParamsError, SimParams, load_params


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vehicles": -5}, "vehicles: Input should be greater than or equal to 1 (got -5)"),
        ({"vehicles": 0}, "vehicles: Input should be greater than or equal to 1"),
        ({"opt_in_rate": 1.5}, "opt_in_rate: Input should be less than or equal to 1 (got 1.5)"),
        ({"days": 0}, "days: Input should be greater than or equal to 1 (got 0)"),
        ({"bin_minutes": 7}, "bin_minutes must divide 1440, got 7"),
        ({"opt_in_rate": float("nan")}, "opt_in_rate"),
        ({"travel": {"speed_kmh": 0}}, "travel.speed_kmh: Input should be greater than 0"),
        ({"charging": {"efficiency": 1.2}}, "charging.efficiency"),
        ({"charging": {"battery_share": [0.5, 0.5, 0.5]}}, "battery_share must add up to 1"),
        (
            {
                "hardware": [
                    {"name": "X", "share": 0.5, "int8_tops": 1, "compute_kw": 1, "memory_gib": 1}
                ]
            },
            "hardware shares must add up to 1, got 0.5",
        ),
        ({"regions": []}, "regions: Tuple should have at least 1 item"),
        ({"warp_drive": True}, "warp_drive: Extra inputs are not permitted"),
        (
            {"policies": [{"name": "p", "share": 1, "policy": {"soc_floor_percent": 140}}]},
            "policies.0.policy.soc_floor_percent",
        ),
    ],
)
def test_impossible_parameters_are_refused_with_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ParamsError) as refused:
        SimParams.build(**fields)
    assert message in str(refused.value)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ParamsError) as refused:
        SimParams.build(vehicles=-1, days=0)
    assert "vehicles" in str(refused.value) and "days" in str(refused.value)


def test_defaults_are_valid_and_round_trip_through_json(tmp_path: Path) -> None:
    params = SimParams.build(vehicles=123, seed=9)
    path = tmp_path / "params.json"
    path.write_text(params.model_dump_json())
    assert load_params(path) == params
    assert load_params(path, days=3).days == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read parameters"),
        ("{not json", "bad JSON at line 1"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"vehicles": -1}), "vehicles: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_parameter_file_names_itself_and_the_problem(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "params.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert str(path) in str(refused.value) and message in str(refused.value)

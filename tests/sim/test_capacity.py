"""The capacity arithmetic reproduces the seeds exactly, then scales them by the factors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlefleet.sim.capacity import (
    FACTOR_NAMES,
    AvailabilityFactors,
    CapacityAssumptions,
    CapacityReport,
    capacity_report,
)

SEED = CapacityAssumptions()
FACTORS = AvailabilityFactors(0.95, 0.3, 0.4, 0.8, source="test")
fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def values(rows: object) -> dict[str, float]:
    assert isinstance(rows, tuple)
    return {row.key: row.value for row in rows}


def test_the_seed_figures_come_out_exactly_with_every_factor_one() -> None:
    # Arrange / Act
    seed = values(capacity_report(SEED, AvailabilityFactors.ones()).seed)

    # Assert: 5,000 TOPS × 10⁶ cars, and the seed's ≈ 11,363 Fugaku at 4.4×10⁵ each
    assert seed["fleet_int8_tops"] == 5e9
    assert seed["fugaku_seed_units"] == 5e9 / 4.4e5
    assert math.floor(seed["fugaku_seed_units"]) == 11_363
    assert seed["fugaku_int8"] == 5e9 / 4.30e6
    assert math.floor(seed["fugaku_int8"]) == 1_162
    assert seed["el_capitan_seed_units"] == 5e9 / 1.742e6
    assert math.floor(seed["el_capitan_seed_units"]) == 2_870
    assert seed["el_capitan_int8"] == 5e9 / (44_544 * 1_961.2)
    assert math.floor(seed["el_capitan_int8"]) == 57
    assert seed["fleet_gw"] == 1.0
    assert seed["el_capitan_power"] == 1_000 / 29.6


def test_a_hundred_million_cars_at_one_kilowatt_draw_exactly_100_gw() -> None:
    report = capacity_report(CapacityAssumptions(vehicles=1e8), AvailabilityFactors.ones())

    seed = values(report.seed)

    assert seed["fleet_gw"] == 100.0
    assert seed["el_capitan_power"] == 100_000 / 29.6


def test_with_every_factor_one_the_after_figures_equal_the_seed_exactly() -> None:
    report = capacity_report(SEED, AvailabilityFactors.ones())

    after = values(report.after)

    for key, value in values(report.seed).items():
        assert after[key] == value, key
    assert [after[f"after_{name}"] for name in FACTOR_NAMES] == [5e9] * 4


def test_every_after_figure_is_its_seed_figure_times_the_product() -> None:
    report = capacity_report(SEED, FACTORS)

    after = values(report.after)

    assert FACTORS.product == 0.95 * 0.3 * 0.4 * 0.8
    for key, value in values(report.seed).items():
        assert after[key] == value * FACTORS.product, key
    assert after["fleet_int8_tops"] == pytest.approx(5e9 * 0.0912)
    assert after["fleet_gw"] == pytest.approx(0.0912)


def test_the_cumulative_rows_show_where_the_capacity_goes_in_order() -> None:
    report = capacity_report(SEED, FACTORS)

    steps = [row for row in report.after if row.key.startswith("after_")]

    assert [row.key for row in steps] == [
        "after_availability",
        "after_opt_in",
        "after_charging",
        "after_thermal",
    ]
    assert [row.value for row in steps] == pytest.approx([4.75e9, 1.425e9, 5.7e8, 4.56e8])
    # The last step is the headline figure, to the bit.
    assert steps[-1].value == values(report.after)["fleet_int8_tops"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vehicles", -5),
        ("vehicles", 0),
        ("vehicles", math.nan),
        ("vehicles", math.inf),
        ("tops_per_vehicle", 0.0),
        ("kw_per_vehicle", -1.0),
        ("el_capitan_mw", math.nan),
    ],
)
def test_assumptions_refuse_what_is_not_a_finite_positive_number(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a positive, finite number, got"):
        CapacityAssumptions(**{field: value})


def test_assumptions_refuse_a_non_number() -> None:
    with pytest.raises(ValueError, match="vehicles must be a positive number, got '1e6'"):
        CapacityAssumptions(vehicles="1e6")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", FACTOR_NAMES)
@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, math.inf, True])
def test_factors_refuse_what_is_not_between_0_and_1(field: str, value: float) -> None:
    change: dict[str, Any] = {field: value}

    with pytest.raises(ValueError, match=rf"^{field} must be between 0 and 1, got {value!r}$"):
        replace(AvailabilityFactors.ones(), **change)


def test_a_factor_of_zero_is_allowed_and_leaves_nothing() -> None:
    report = capacity_report(SEED, AvailabilityFactors(0.95, 0.0, 0.4, 0.8))

    assert values(report.after)["fleet_int8_tops"] == 0.0


def test_figures_out_of_float_range_are_refused_not_printed_as_inf() -> None:
    huge = CapacityAssumptions(vehicles=1e300, tops_per_vehicle=1e300)

    with pytest.raises(ValueError, match="fleet_int8_tops comes to inf"):
        capacity_report(huge, AvailabilityFactors.ones())


def test_to_dict_is_json_and_keeps_every_figure_exact() -> None:
    report = capacity_report(SEED, FACTORS)

    loaded = json.loads(json.dumps(report.to_dict()))

    assert loaded["factors"] == {
        "availability": 0.95,
        "opt_in": 0.3,
        "charging": 0.4,
        "thermal": 0.8,
        "source": "test",
        "product": FACTORS.product,
    }
    assert loaded["assumptions"]["vehicles"] == 1_000_000
    assert {row["key"]: row["value"] for row in loaded["seed"]} == values(report.seed)
    assert {row["key"]: row["value"] for row in loaded["after"]} == values(report.after)
    assert loaded["omitted"]


def test_the_text_labels_peak_and_sustained_and_the_seeds_units() -> None:
    report = capacity_report(SEED, FACTORS)

    text = report.format_text()

    assert "Seed arithmetic (every factor = 1; peak INT8 TOPS, nameplate)" in text
    assert "After the fleet model's factors (sustained INT8 TOPS)" in text
    assert "What the seed leaves out" in text
    assert "5.00e9 INT8 TOPS" in text
    assert "11,363.6 Fugaku" in text
    assert "INT8 TOPS ÷ FP64 TFLOPS — not the same unit" in text
    assert "4.56e8 INT8 TOPS   average sustained available compute" in text
    assert "after opt-in (28.5% of nameplate)" in text
    assert "factors: test" in text


@given(
    base=st.tuples(fractions, fractions, fractions, fractions),
    which=st.sampled_from(FACTOR_NAMES),
    bigger=fractions,
)
def test_after_figures_never_exceed_the_seed_and_grow_with_each_factor(
    base: tuple[float, float, float, float], which: str, bigger: float
) -> None:
    # Arrange: the same factors, except one raised to at least its old value
    lower = AvailabilityFactors(*base)
    higher = replace(lower, **{which: max(getattr(lower, which), bigger)})

    # Act
    low, high = capacity_report(SEED, lower), capacity_report(SEED, higher)

    # Assert
    assert_after_within_seed(low)
    steps = [row.value for row in low.after if row.key.startswith("after_")]
    assert steps == sorted(steps, reverse=True)
    for key, value in values(low.after).items():
        assert value <= values(high.after)[key], key


def assert_after_within_seed(report: CapacityReport) -> None:
    seed, after = values(report.seed), values(report.after)
    for key, value in seed.items():
        assert 0 <= after[key] <= value, key

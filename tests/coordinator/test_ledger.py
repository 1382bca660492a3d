"""The ledger's pure core: prices, charges, releases and reversals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlefleet.coordinator.ledger import (
    FEES,
    ModelPrice,
    Prices,
    Work,
    charge_entry,
    release_entry,
    reversal_entry,
)

PRICES = Prices(
    models={"m": ModelPrice(input_per_1k=7, output_per_1k=13, per_request=3)},
    owner_share_bp=6667,
    tariffs={"eu": 300_000},
)

works = st.builds(
    Work,
    key=st.text("abc:-", min_size=1, max_size=12),
    principal=st.sampled_from(["acme", "globex"]),
    vehicle_id=st.sampled_from(["car-1", "car-2"]),
    owner=st.sampled_from(["alice", "bob"]),
    model=st.sampled_from(["m", "unknown-model"]),
    requests=st.integers(0, 10**6),
    input_tokens=st.integers(0, 10**9),
    output_tokens=st.integers(0, 10**9),
    energy_j=st.floats(0, 1e9),
    work_at=st.floats(0, 2e9),
    region=st.sampled_from([None, "eu", "us"]),
)


@settings(max_examples=300, deadline=None)
@given(work=works)
def test_every_entry_sums_to_zero_and_the_charge_is_tokens_times_prices(work: Work) -> None:
    charge = charge_entry(work, PRICES, 10.0)
    p = PRICES.price(work.model)
    exact = work.input_tokens * p.input_per_1k + work.output_tokens * p.output_per_1k
    # Rounded up to a whole micro-unit, never by more than one.
    tokens_part = charge.charged - work.requests * p.per_request
    assert 0 <= tokens_part * 1000 - exact < 1000
    earned = charge.earned
    assert earned == charge.charged * 6667 // 10_000
    assert charge.amount(FEES) == charge.charged - earned
    for entry in (charge, release_entry(charge, 11.0), reversal_entry(charge, 11.0)):
        assert sum(a for _, a in entry.postings) == 0
    reversal = reversal_entry(charge, 11.0)
    assert reversal.settles == charge.id and reversal.charged == -charge.charged
    release = release_entry(charge, 11.0)
    assert release.amount(f"owner:{work.owner}") == earned
    assert release.amount(f"escrow:{work.owner}") == -earned


def test_the_same_work_gives_the_same_entry_id() -> None:
    work = Work("batch:b1:car-1", "acme", "car-1", "alice", "m", 2, 1000, 0, 3.6e6, 5.0)
    assert charge_entry(work, PRICES, 1.0).id == charge_entry(work, PRICES, 2.0).id
    assert charge_entry(work, PRICES, 1.0).electricity == 250_000  # default tariff, 1 kWh


def test_an_entry_whose_postings_do_not_sum_to_zero_is_refused() -> None:
    work = Work("k", "acme", "car-1", "alice", "m", 1, 1, 1, 0.0, 0.0)
    charge = charge_entry(work, PRICES, 1.0)
    with pytest.raises(ValueError, match="sum to zero"):
        type(charge)(**{**charge.__dict__, "postings": (("customer:acme", -1),)})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "JSON object"),
        ({"owner_share_bp": 10_001}, "owner_share_bp"),
        ({"owner_share_bp": 1.5}, "owner_share_bp"),
        ({"models": {"m": {"input_per_1k": -1}}}, "m.input_per_1k"),
        ({"models": {"m": {"input_per_1k": True}}}, "m.input_per_1k"),
        ({"models": {"m": {"per_token": 1}}}, "unknown field"),
        ({"models": {"": {}}}, "model name"),
        ({"tariffs": {"Europe!": 1}}, "tariff region"),
        ({"currency": "dollars"}, "currency"),
        ({"fees": 1}, "unknown price field"),
        ({"default": {"output_per_1k": 10**13}}, "default.output_per_1k"),
    ],
)
def test_a_bad_price_list_is_refused_with_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Prices.parse(data)


def test_a_price_list_file_round_trips(tmp_path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        '{"currency": "EUR", "owner_share_bp": 5000, '
        '"models": {"m": {"input_per_1k": 5, "per_request": 1}}, "tariffs": {"eu": 1}}'
    )
    prices = Prices.load(path)
    assert prices.currency == "EUR" and prices.owner_share_bp == 5000
    assert prices.charge("m", 2, 1001, 0) == 6 + 2  # 5.005 rounded up, + 2 requests
    path.write_text("{not json")
    with pytest.raises(ValueError, match="price list"):
        Prices.load(path)

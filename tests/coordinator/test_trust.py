"""The trust core: rates, probe counts and verdicts, without I/O."""

from __future__ import annotations

import random

import pytest

from idlefleet.coordinator.trust import (
    CarTrust,
    TrustPolicy,
    after_verdict,
    check_rate,
    probes_for,
    reinstated,
)

POLICY = TrustPolicy(floor=0.03, new_car_checks=10)


def test_a_new_car_has_new_car_checks_results_of_every_chunk_probed() -> None:
    car = CarTrust("car-1", streak=9)
    assert check_rate(car, POLICY) == 1.0
    assert probes_for(car, POLICY, [5, 1, 3], 1.0, random.Random(0)) == [0, 1, 2]
    picked = probes_for(car, POLICY, [1] * 256, 1.0, random.Random(0))
    assert len(picked) == 10 and len(set(picked)) == 10


def test_the_rate_halves_every_new_car_checks_then_stops_at_the_floor() -> None:
    assert check_rate(CarTrust("c", streak=10), POLICY) == 1.0
    assert check_rate(CarTrust("c", streak=20), POLICY) == 0.5
    assert check_rate(CarTrust("c", streak=55), POLICY) == pytest.approx(0.5**4.5)
    # BOINC's would go on falling (0.7% at 10,000): ours never below the floor.
    assert check_rate(CarTrust("c", streak=70), POLICY) == 0.03
    assert check_rate(CarTrust("c", streak=10**9), POLICY) == 0.03


def test_probes_spend_the_rate_of_the_work_on_average() -> None:
    car = CarTrust("c", streak=10**6)
    rng = random.Random(1)
    works = [8] * 16  # 128 units of work, probes of 1: 3.84 probes expected
    counts = [len(probes_for(car, POLICY, works, 1.0, rng)) for _ in range(4000)]
    assert set(counts) == {3, 4}
    assert sum(counts) / len(counts) == pytest.approx(0.03 * 128, rel=0.02)


def test_a_small_chunk_is_probed_now_and_then() -> None:
    car = CarTrust("c", streak=10**6)
    rng = random.Random(2)
    counts = [len(probes_for(car, POLICY, [1], 1.0, rng)) for _ in range(10_000)]
    assert sum(counts) / len(counts) == pytest.approx(0.03, abs=0.006)


def test_a_strict_batch_probes_every_request_of_a_trusted_car() -> None:
    car = CarTrust("c", streak=10**6)
    assert probes_for(car, POLICY, [1] * 5, 1.0, random.Random(0), strict=True) == [0, 1, 2, 3, 4]
    assert probes_for(car, POLICY, [], 1.0, random.Random(0), strict=True) == []


def test_agreeing_grows_the_streak_and_moves_the_verified_horizon_forward_only() -> None:
    car = after_verdict(CarTrust("c"), "agree", committed_at=50.0, now=60.0)
    car = after_verdict(car, "agree", committed_at=40.0, now=61.0)  # an older result's probe
    assert (car.streak, car.agreed, car.verified_through) == (2, 2, 50.0)
    assert not car.quarantined


def test_a_lost_probe_quarantines_and_resets_and_nothing_undoes_it_but_reinstating() -> None:
    car = CarTrust("c", streak=500, agreed=500, verified_through=10.0)
    caught = after_verdict(car, "disagree", committed_at=20.0, now=30.0, reason="wrong")
    assert caught.quarantined and caught.quarantined_at == 30.0 and caught.reason == "wrong"
    assert (caught.streak, caught.disagreed, caught.verified_through) == (0, 1, 10.0)
    assert after_verdict(caught, "agree", 40.0, 41.0) == caught
    back = reinstated(caught)
    assert not back.quarantined and back.streak == 0 and check_rate(back, POLICY) == 1.0


@pytest.mark.parametrize(
    "fields",
    [{"floor": 0.0}, {"floor": 1.5}, {"canary_new": -0.1}, {"new_car_checks": 0}],
)
def test_a_policy_out_of_range_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TrustPolicy(**fields)  # type: ignore[arg-type]


def test_every_unit_of_enough_requests_gets_a_probe_whatever_its_work() -> None:
    car = CarTrust("c", streak=10**6)  # at the floor, 3%: 17 requests or more
    rng = random.Random(3)
    for works in ([1] * 17, [1] * 32, [8] * 32, [1, 8] * 16):
        # expected by work can be far below one probe (17 x 1 x 0.03 / 8 = 0.06)
        counts = [len(probes_for(car, POLICY, works, 8.0, rng)) for _ in range(500)]
        assert min(counts) >= 1
    counts = [len(probes_for(car, POLICY, [1] * 16, 8.0, rng)) for _ in range(500)]
    assert min(counts) == 0  # a smaller unit only now and then

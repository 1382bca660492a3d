"""The energy meter: per local day, per lease, and kept across restarts."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from idlefleet.agent.energy import JOULES_PER_KWH, EnergyMeter

DAY = date(2026, 11, 22)


def test_meter_counts_per_day_and_per_lease(tmp_path: Path) -> None:
    meter = EnergyMeter()
    meter.record(1800.0, DAY, "lease-a")
    meter.record(1800.0, DAY, "lease-a")
    meter.record(3600.0, DAY, "lease-b")
    assert meter.today_kwh(DAY) == pytest.approx(7200.0 / JOULES_PER_KWH)
    assert meter.take_lease("lease-a") == 3600.0
    assert meter.take_lease("lease-a") == 0.0  # reported once
    meter.record(100.0, date(2026, 11, 23))
    assert meter.today_kwh(date(2026, 11, 23)) == pytest.approx(100.0 / JOULES_PER_KWH)
    assert meter.today_kwh(DAY) == 0.0  # a new day starts from zero
    assert meter.total_j == 7300.0
    with pytest.raises(ValueError):
        meter.record(-1.0, DAY)


def test_a_restarted_agent_remembers_todays_energy(tmp_path: Path) -> None:
    path = tmp_path / "state" / "car.energy.json"
    meter = EnergyMeter(path)
    meter.record(JOULES_PER_KWH, DAY)
    meter.save()
    assert EnergyMeter(path).today_kwh(DAY) == pytest.approx(1.0)


def test_a_corrupt_meter_file_starts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "car.energy.json"
    path.write_text("{not json")
    assert EnergyMeter(path).today_kwh(DAY) == 0.0


def test_the_file_holds_every_metered_run_without_a_save(tmp_path: Path) -> None:
    # A SIGKILL skips the clean shutdown's save(): the file must already hold each run.
    path = tmp_path / "state" / "car.energy.json"
    meter = EnergyMeter(path)
    for i in range(1, 6):
        meter.record(1000.0, DAY, "lease-a")
        assert EnergyMeter(path).today_kwh(DAY) == pytest.approx(i * 1000.0 / JOULES_PER_KWH)
    assert not path.with_suffix(".tmp").exists()


@pytest.mark.parametrize("text", ['{"day": "2026-11-22", "today_j": NaN}', '{"day": "x"}', "[]"])
def test_a_meter_file_with_bad_values_starts_from_zero(tmp_path: Path, text: str) -> None:
    path = tmp_path / "car.energy.json"
    path.write_text(text)
    assert EnergyMeter(path).today_kwh(DAY) == 0.0


def test_a_non_finite_energy_is_refused(tmp_path: Path) -> None:
    meter = EnergyMeter(tmp_path / "e.json")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite"):
            meter.record(bad, DAY)
    assert not (tmp_path / "e.json").exists()

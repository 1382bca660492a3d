"""A run's files hold what the run computed: summary and parameters, series, histograms."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from idlefleet.sim.outputs import write_outputs
from idlefleet.sim.params import SimParams, load_params
from idlefleet.sim.run import SimResult, simulate
from idlefleet.sim.tally import EARNINGS_EDGES, LENGTH_EDGES, SERIES

PARAMS = SimParams.build(vehicles=2000, days=2, chunk_vehicles=1000)
UNITS = ("_vehicles", "_int8_tops_peak", "_int8_tops_sustained", "_kw")


@pytest.fixture(scope="module")
def result() -> SimResult:
    return simulate(PARAMS, workers=1)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as file:
        header, *rows = list(csv.reader(file))
    return header, rows


def column(path: Path, name: str) -> np.ndarray:
    header, rows = read_csv(path)
    return np.array([float(row[header.index(name)]) for row in rows])


def strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_writes_the_summary_and_three_tables(result: SimResult, tmp_path: Path) -> None:
    # Act
    written = write_outputs(result, tmp_path / "out")

    # Assert
    names = ["summary.json", "timeseries.csv", "windows.csv", "earnings.csv"]
    assert written == [tmp_path / "out" / name for name in names]
    assert all(path.is_file() and path.stat().st_size > 0 for path in written)


def test_summary_json_is_the_summary_with_the_params(result: SimResult, tmp_path: Path) -> None:
    # Act
    write_outputs(result, tmp_path)

    # Assert
    document = strict_json((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    expected = json.loads(json.dumps(result.summary()))
    assert {key: document[key] for key in expected if key != "factors"} == {
        key: value for key, value in expected.items() if key != "factors"
    }
    factors = document["factors"]
    assert {key: factors[key] for key in expected["factors"]} == expected["factors"]
    assert factors["source"] == "fleet model: 2,000 vehicles × 2 days, seed 0 (idlefleet sim)"
    assert document["params"] == PARAMS.model_dump(mode="json")


def test_the_params_written_load_back_as_the_same_params(result: SimResult, tmp_path: Path) -> None:
    # Arrange
    write_outputs(result, tmp_path)
    document = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(document["params"]), encoding="utf-8")

    # Act
    loaded = load_params(params_file)

    # Assert
    assert loaded == PARAMS


def test_an_empty_histogram_median_is_null_not_nan(tmp_path: Path) -> None:
    # Arrange: nobody opted in, so there is no compute session to take a median of
    nobody = simulate(SimParams.build(vehicles=200, days=1, opt_in_rate=0), workers=1)

    # Act
    write_outputs(nobody, tmp_path)

    # Assert
    document = strict_json((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    assert document["windows"]["compute_session_min_median"] is None


def test_timeseries_has_one_row_per_bin_and_units_in_the_names(
    result: SimResult, tmp_path: Path
) -> None:
    # Act
    write_outputs(result, tmp_path)

    # Assert
    header, rows = read_csv(tmp_path / "timeseries.csv")
    assert header == ["utc_minute", "weekday_utc", "time_utc", *SERIES]
    assert all(name.endswith(UNITS) for name in SERIES)
    assert len(rows) == PARAMS.days * 1440 // PARAMS.bin_minutes
    assert all(len(row) == len(header) for row in rows)


def test_timeseries_values_are_the_run_s_within_rounding(result: SimResult, tmp_path: Path) -> None:
    # Act
    write_outputs(result, tmp_path)

    # Assert
    series = result.timeseries()
    path = tmp_path / "timeseries.csv"
    np.testing.assert_array_equal(column(path, "utc_minute"), series["minute"])
    for name in SERIES:
        np.testing.assert_allclose(column(path, name), series[name], rtol=5e-6, atol=0)


def test_weekday_and_time_are_in_utc_from_the_start_weekday(tmp_path: Path) -> None:
    # Arrange: day 0 a Sunday, hourly bins
    params = SimParams.build(vehicles=200, days=2, start_weekday=6, bin_minutes=60)
    sunday_start = simulate(params, workers=1)

    # Act
    write_outputs(sunday_start, tmp_path)

    # Assert
    _, rows = read_csv(tmp_path / "timeseries.csv")
    assert rows[0][:3] == ["0", "Sun", "00:00"]
    assert rows[23][:3] == ["1380", "Sun", "23:00"]
    assert rows[24][:3] == ["1440", "Mon", "00:00"]
    assert rows[-1][:3] == ["2820", "Mon", "23:00"]


def test_windows_histogram_adds_up_to_the_tally(result: SimResult, tmp_path: Path) -> None:
    # Act
    write_outputs(result, tmp_path)

    # Assert
    path = tmp_path / "windows.csv"
    header, rows = read_csv(path)
    assert header == ["min_from", "min_to", "compute_sessions", "parked_windows"]
    assert len(rows) == len(LENGTH_EDGES) - 1
    np.testing.assert_array_equal(column(path, "min_from"), LENGTH_EDGES[:-1])
    np.testing.assert_array_equal(column(path, "min_to"), LENGTH_EDGES[1:])
    assert column(path, "compute_sessions").sum() == result.tally.sessions > 0
    np.testing.assert_array_equal(column(path, "parked_windows"), result.tally.parked_hist)
    assert all(row[2].isdigit() and row[3].isdigit() for row in rows)  # counts, not floats


def test_earnings_histogram_counts_every_opted_in_owner(result: SimResult, tmp_path: Path) -> None:
    # Act
    write_outputs(result, tmp_path)

    # Assert
    path = tmp_path / "earnings.csv"
    header, rows = read_csv(path)
    assert header == ["usd_from", "usd_to", "opted_in_owners"]
    assert len(rows) == len(EARNINGS_EDGES) - 1
    np.testing.assert_array_equal(column(path, "usd_from"), EARNINGS_EDGES[:-1])
    assert column(path, "opted_in_owners").sum() == result.tally.opted_in_vehicles > 0


def test_parquet_tables_round_trip_at_full_precision(result: SimResult, tmp_path: Path) -> None:
    # Act
    written = write_outputs(result, tmp_path, table_format="parquet")

    # Assert
    assert [path.name for path in written[1:]] == [
        "timeseries.parquet",
        "windows.parquet",
        "earnings.parquet",
    ]
    series = pq.read_table(tmp_path / "timeseries.parquet").to_pydict()
    assert list(series) == ["utc_minute", "weekday_utc", "time_utc", *SERIES]
    assert series["weekday_utc"][:1] + series["time_utc"][:2] == ["Mon", "00:00", "00:15"]
    expected = result.timeseries()
    for name in SERIES:
        np.testing.assert_array_equal(series[name], expected[name])
    windows = pq.read_table(tmp_path / "windows.parquet").to_pydict()
    np.testing.assert_array_equal(windows["compute_sessions"], result.tally.session_hist)
    earnings = pq.read_table(tmp_path / "earnings.parquet").to_pydict()
    assert sum(earnings["opted_in_owners"]) == result.tally.opted_in_vehicles


def test_parquet_without_pyarrow_says_how_to_get_it(
    result: SimResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a None entry makes ``import pyarrow`` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)

    # Act / Assert
    with pytest.raises(ValueError, match=r"pip install 'idlefleet\[sim\]'"):
        write_outputs(result, tmp_path / "out", table_format="parquet")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_unknown_format_names_the_allowed_ones(result: SimResult, tmp_path: Path) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="'xlsx'; choose from csv, parquet"):
        write_outputs(result, tmp_path, table_format="xlsx")

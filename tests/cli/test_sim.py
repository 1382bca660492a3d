"""``idlefleet sim``: files, summary, flags over --params, and exit 2 on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from idlefleet.cli.main import main

TINY = ["--days", "2", "--chunk-vehicles", "1000", "--workers", "1"]
FLEET = ["--vehicles", "2000", *TINY]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["sim", *argv])
    except SystemExit as exited:  # argparse refuses a value by exiting
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def summary_of(capsys: pytest.CaptureFixture[str], out: Path, *argv: str) -> dict[str, Any]:
    code, stdout, err = run(capsys, *argv, "--out", str(out), "--no-plots", "--json", "--quiet")
    assert (code, err) == (0, "")
    summary: dict[str, Any] = json.loads(stdout)
    return summary


def written(tmp_path: Path, content: object, name: str = "params.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_writes_tables_and_plots_and_prints_the_headlines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange
    out = tmp_path / "run"

    # Act
    code, stdout, err = run(capsys, *FLEET, "--out", str(out))

    # Assert
    assert code == 0
    names = ["summary.json", "timeseries.csv", "windows.csv", "earnings.csv"]
    names += ["capacity.png", "windows.png", "earnings.png"]
    assert sorted(path.name for path in out.iterdir()) == sorted(names)
    assert all(f"  {out / name}\n" in stdout for name in names)
    assert "2,000 vehicles × 2 days (4,000 vehicle-days), seed 0" in stdout
    for label in ("parked", "driving", "mean compute, sustained", "factors", "compute energy"):
        assert f"\n  {label} " in stdout
    assert "INT8 TOPS" in stdout
    assert f"idlefleet capacity --factors-from {out / 'summary.json'}" in stdout
    assert "2/2 chunks simulated" in err  # progress goes to stderr, not stdout
    assert "chunks" not in stdout


def test_quiet_prints_no_progress(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Act
    code, _, err = run(capsys, *FLEET, "--out", str(tmp_path), "--no-plots", "--quiet")

    # Assert
    assert (code, err) == (0, "")
    assert not list(tmp_path.glob("*.png"))


def test_json_prints_the_summary_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Act
    summary = summary_of(capsys, tmp_path, *FLEET)

    # Assert
    assert summary == json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["calibration"]) == {
        "parked_fraction",
        "driving_min_per_vehicle_day",
        "trips_per_vehicle_day",
        "plugged_fraction_of_parked",
    }
    assert 0.9 < summary["calibration"]["parked_fraction"] < 1
    assert summary["run"]["vehicles"] == 2000


@pytest.mark.parametrize("spelling", ["2000", "2e3", "2_000", "2000.0"])
def test_vehicles_may_be_written_several_ways(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spelling: str
) -> None:
    # Act
    summary = summary_of(capsys, tmp_path, "--vehicles", spelling, *TINY)

    # Assert
    assert summary["params"]["vehicles"] == 2000


def test_parquet_tables(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Act
    summary_of(capsys, tmp_path, *FLEET, "--format", "parquet")

    # Assert
    assert {path.suffix for path in tmp_path.iterdir()} == {".json", ".parquet"}


def test_flags_override_the_params_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Arrange
    params = written(
        tmp_path,
        {"vehicles": 1000, "days": 1, "opt_in_rate": 0.5, "economics": {"utilization": 0.4}},
    )

    # Act
    summary = summary_of(
        capsys,
        tmp_path / "out",
        "--params",
        params,
        "--opt-in",
        "0.2",
        "--price",
        "0.5",
        "--revenue-share",
        "0.6",
        "--electricity-price",
        "0.2",
        "--workers",
        "1",
    )

    # Assert
    p = summary["params"]
    assert (p["vehicles"], p["days"], p["opt_in_rate"]) == (1000, 1, 0.2)
    assert p["economics"] == {
        "price_usd_per_1k_tops_hour": 0.5,
        "revenue_share": 0.6,
        "electricity_usd_per_kwh": 0.2,
        "utilization": 0.4,  # from the file: a flag changes only its own field
    }
    assert summary["earnings"]["price_usd_per_1k_tops_hour"] == 0.5


def test_a_summary_file_as_params_repeats_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange
    first = summary_of(capsys, tmp_path / "first", *FLEET, "--seed", "3", "--opt-in", "0.4")

    # Act
    again = summary_of(
        capsys,
        tmp_path / "again",
        "--params",
        str(tmp_path / "first" / "summary.json"),
        "--workers",
        "1",
    )

    # Assert
    assert again["params"] == first["params"]
    for key in ("calibration", "compute", "factors", "earnings", "windows"):
        assert again[key] == first[key]


def test_hardware_mix_reweights_the_classes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Act: every car an HW4 (500 INT8 TOPS); the classes not named get share 0
    summary = summary_of(capsys, tmp_path, *FLEET, "--hardware-mix", "HW4=1")

    # Assert
    shares = {hw["name"]: hw["share"] for hw in summary["params"]["hardware"]}
    assert shares == {"HW3": 0.0, "HW4": 1.0, "AI5": 0.0}
    assert summary["compute"]["fleet_peak_int8_tops"] == 2000 * 500


def test_capacity_reads_the_factors_the_run_wrote(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange
    summary = summary_of(capsys, tmp_path, *FLEET)

    # Act
    code = main(["capacity", "--factors-from", str(tmp_path / "summary.json"), "--json"])

    # Assert
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    numbers = ("availability", "opt_in", "charging", "thermal", "product")
    assert {key: report["factors"][key] for key in numbers} == {
        key: summary["factors"][key] for key in numbers
    }
    assert report["factors"]["source"].startswith("fleet model: 2,000 vehicles × 2 days, seed 0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vehicles", "-5"], "argument --vehicles: must be at least 1, got -5"),
        (["--vehicles", "abc"], "argument --vehicles: must be a whole number, got 'abc'"),
        (["--vehicles", "2.5"], "argument --vehicles: must be a whole number, got '2.5'"),
        (["--opt-in", "1.5"], "argument --opt-in: must be a fraction between 0 and 1, got 1.5"),
        (["--days", "0"], "argument --days: must be at least 1, got 0"),
        (["--workers", "0"], "argument --workers: must be at least 1, got 0"),
        (["--price", "-1"], "argument --price: must be 0 or more, got -1"),
        (["--utilization", "nan"], "argument --utilization: must be a finite number, got nan"),
        (["--hardware-mix", "HW3"], "argument --hardware-mix: expected NAME=SHARE"),
        (["--hardware-mix", "HW3=2"], "share of HW3 must be a fraction between 0 and 1, got 2"),
        (["--hardware-mix", "HW3=0.5,HW3=0.5"], "HW3 is given twice"),
        (["--format", "xlsx"], "argument --format: invalid choice: 'xlsx'"),
    ],
)
def test_malformed_flags_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    # Act
    code, stdout, err = run(capsys, *argv, "--out", str(tmp_path / "out"))

    # Assert
    assert (code, stdout) == (2, "")
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--hardware-mix", "HW9=1"],
            "idlefleet sim: error: --hardware-mix: unknown hardware class HW9; "
            "known: HW3, HW4, AI5",
        ),
        (["--hardware-mix", "HW3=0.5"], "hardware shares must add up to 1, got 0.5"),
        (["--vehicles", "2e10"], "vehicles: Input should be less than or equal to 10000000000"),
    ],
)
def test_what_only_the_params_can_judge_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    # Act
    code, stdout, err = run(capsys, *TINY, *argv, "--out", str(tmp_path / "out"))

    # Assert
    assert (code, stdout) == (2, "")
    assert message in err
    assert not (tmp_path / "out").exists()  # refused before the run


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read parameters"),
        ("{not json", "bad JSON at line 1"),
        ({"vehicles": -1}, "vehicles: Input should be greater than or equal to 1 (got -1)"),
        ({"vehicle": 10}, "vehicle: Extra inputs are not permitted"),
    ],
)
def test_a_bad_params_file_exits_2_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: object, message: str
) -> None:
    # Arrange
    path = str(tmp_path / "missing.json") if content is None else written(tmp_path, content)

    # Act
    code, stdout, err = run(capsys, *TINY, "--params", path, "--out", str(tmp_path / "out"))

    # Assert
    assert (code, stdout) == (2, "")
    assert err.startswith(f"idlefleet sim: error: {path}: ")
    assert message in err


def test_an_out_path_that_is_a_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange
    blocker = tmp_path / "taken"
    blocker.write_text("")

    # Act
    code, _, err = run(capsys, *FLEET, "--out", str(blocker / "out"), "--quiet")

    # Assert
    assert code == 2
    assert f"--out {blocker / 'out'}: cannot create it" in err


@pytest.mark.parametrize(
    ("module", "argv"),
    [("pyarrow", ["--format", "parquet", "--no-plots"]), ("matplotlib", [])],
)
def test_a_missing_extra_exits_2_before_the_run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    argv: list[str],
) -> None:
    # Arrange: a None entry makes the import fail as if the package were not installed
    monkeypatch.setitem(sys.modules, module, None)

    # Act
    code, stdout, err = run(capsys, *FLEET, *argv, "--out", str(tmp_path / "out"))

    # Assert
    assert (code, stdout) == (2, "")
    assert "pip install 'idlefleet[sim]'" in err
    assert "chunks" not in err  # nothing was simulated
    assert not (tmp_path / "out").exists()

"""``idlefleet capacity``: the seed's figures, JSON, factor precedence and exit 2 on bad input."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from idlefleet.cli.main import main
from idlefleet.sim.capacity import AvailabilityFactors

ONES = ["--availability", "1", "--opt-in", "1", "--charging", "1", "--thermal", "1"]
MODEL = AvailabilityFactors(0.9, 0.5, 0.5, 0.8, source="fleet model: stub")


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stands in for ``idlefleet.sim.factors`` so no test runs the real fleet model."""
    calls: list[int] = []

    def fleet_model_factors() -> AvailabilityFactors:
        calls.append(1)
        return MODEL

    stub = types.SimpleNamespace(fleet_model_factors=fleet_model_factors)
    monkeypatch.setitem(sys.modules, "idlefleet.sim.factors", stub)
    return calls


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["capacity", *argv])
    except SystemExit as exited:  # argparse refuses a value by exiting
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def after(report: dict[str, object]) -> dict[str, float]:
    rows = report["after"]
    assert isinstance(rows, list)
    return {row["key"]: row["value"] for row in rows}


def written(tmp_path: Path, content: object, name: str = "sim.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_text_output_shows_the_seed_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *ONES)

    assert (code, err) == (0, "")
    assert "5.00e9 INT8 TOPS   fleet peak compute" in out
    assert "11,363.6 Fugaku      Fugaku equivalents (seed's units" in out
    assert "2,870.3 El Capitan  El Capitan equivalents (seed's units" in out
    assert "factors: flags" in out


def test_json_has_the_exact_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *ONES, "--vehicles", "1e8", "--json")

    report = json.loads(out)
    seed = {row["key"]: row["value"] for row in report["seed"]}
    assert code == 0
    assert seed["fleet_int8_tops"] == 5e11
    assert seed["fugaku_seed_units"] == 5e11 / 4.4e5
    assert seed["fleet_gw"] == 100.0
    assert {key: after(report)[key] for key in seed} == seed  # every factor 1: after == seed
    assert report["factors"]["product"] == 1.0


@pytest.mark.parametrize("spelling", ["1000000", "1e6", "1_000_000", "1000000.0"])
def test_numbers_may_be_written_several_ways(
    capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    code, out, _ = run(capsys, *ONES, "--vehicles", spelling, "--json")

    assert code == 0
    assert json.loads(out)["assumptions"]["vehicles"] == 1_000_000


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--vehicles", "-5"], "argument --vehicles: must be a positive, finite number, got -5"),
        (["--vehicles", "0"], "argument --vehicles: must be a positive, finite number, got 0"),
        (["--vehicles", "many"], "argument --vehicles: must be a number, got 'many'"),
        (["--kw-per-vehicle", "inf"], "argument --kw-per-vehicle: must be a positive, finite"),
        (["--opt-in", "1.5"], "argument --opt-in: must be between 0 and 1, got 1.5"),
        (["--thermal", "nan"], "argument --thermal: must be between 0 and 1, got nan"),
        (["--availability", "-0.5"], "argument --availability: must be between 0 and 1, got -0.5"),
    ],
)
def test_bad_numbers_exit_2_with_the_reason(
    capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    code, out, err = run(capsys, *argv)

    assert (code, out) == (2, "")
    assert f"idlefleet capacity: error: {reason}" in err


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not JSON"),
        ([0.5], "no 'factors' object"),
        ({"factors": 0.5}, "no 'factors' object"),
        ({"factors": {"opt-in": 0.5}}, "unknown key(s) opt-in in 'factors'"),
        ({"factors": {"charging": 2.0}}, "factors.charging must be between 0 and 1, got 2.0"),
        ({"factors": {"thermal": "0.8"}}, "factors.thermal must be between 0 and 1, got '0.8'"),
    ],
)
def test_a_bad_factors_file_exits_2_naming_the_file_and_the_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: object, reason: str
) -> None:
    path = written(tmp_path, content)

    code, out, err = run(capsys, "--factors-from", path)

    assert (code, out) == (2, "")
    assert err.startswith(f"idlefleet capacity: error: --factors-from {path}: ")
    assert reason in err


def test_a_missing_factors_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--factors-from", "missing.json")

    assert code == 2
    assert "--factors-from missing.json: cannot read it (No such file or directory)" in err


def test_flags_override_the_file_and_the_file_is_all_that_is_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model_calls: list[int]
) -> None:
    factors = {"availability": 0.9, "opt_in": 0.2, "charging": 0.5, "thermal": 0.7}
    path = written(tmp_path, {"factors": {**factors, "source": "sim run 7"}})

    code, out, _ = run(capsys, "--factors-from", path, "--opt-in", "0.4", "--json")

    report = json.loads(out)
    assert code == 0
    assert model_calls == []
    assert report["factors"] == {
        **factors,
        "opt_in": 0.4,
        "source": f"opt_in: flags; availability, charging, thermal: sim run 7 (from {path})",
        "product": 0.9 * 0.4 * 0.5 * 0.7,
    }
    assert after(report)["fleet_int8_tops"] == 5e9 * (0.9 * 0.4 * 0.5 * 0.7)


def test_the_json_output_reads_back_as_a_factors_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model_calls: list[int]
) -> None:
    _, first, _ = run(capsys, "--availability", "0.9", "--opt-in", "0.3", *ONES[4:], "--json")
    path = written(tmp_path, first)

    code, second, _ = run(capsys, "--factors-from", path, "--json")

    assert code == 0
    assert model_calls == []
    assert after(json.loads(second)) == after(json.loads(first))


def test_factors_given_nowhere_come_from_the_fleet_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model_calls: list[int]
) -> None:
    path = written(tmp_path, {"factors": {"availability": 0.95}})

    code, out, _ = run(capsys, "--factors-from", path, "--thermal", "1", "--json")

    factors = json.loads(out)["factors"]
    assert code == 0
    assert model_calls == [1]
    assert (factors["availability"], factors["opt_in"], factors["charging"]) == (0.95, 0.5, 0.5)
    assert factors["thermal"] == 1.0
    assert factors["source"] == (
        f"thermal: flags; availability: {path}; opt_in, charging: fleet model: stub"
    )


def test_with_no_factor_flags_the_fleet_model_supplies_them_all(
    capsys: pytest.CaptureFixture[str], model_calls: list[int]
) -> None:
    code, out, _ = run(capsys)

    assert code == 0
    assert model_calls == [1]
    assert "factors: fleet model: stub" in out
    assert "availability 0.900 × opt_in 0.500 × charging 0.500 × thermal 0.800 = 0.180" in out


def test_all_four_flags_never_run_the_fleet_model(
    capsys: pytest.CaptureFixture[str], model_calls: list[int]
) -> None:
    code, _, _ = run(capsys, *ONES)

    assert code == 0
    assert model_calls == []


def test_a_bad_file_is_refused_even_when_flags_give_every_factor(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = written(tmp_path, {"factors": {"opt_in": 1.5}})

    code, _, err = run(capsys, *ONES, "--factors-from", path)

    assert code == 2
    assert "factors.opt_in must be between 0 and 1, got 1.5" in err


def test_without_the_fleet_model_module_missing_factors_are_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail as if the module were absent.
    monkeypatch.setitem(sys.modules, "idlefleet.sim.factors", None)

    code, _, err = run(capsys, "--availability", "1")

    assert code == 2
    assert "the fleet model (idlefleet.sim.factors) is not available" in err

"""Traffic and servers per region from the fleet model: hand-computed cases, scaling, the
limit that binds, refused inputs, and the script end to end on a real run."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
from pydantic import ValidationError

from idlefleet.sim.outputs import write_outputs
from idlefleet.sim.params import SimParams
from idlefleet.sim.rates import (
    Peaks,
    Rates,
    RatesInputError,
    ScaleLimits,
    TrafficAssumptions,
    figures_from_summary,
    peaks_from_timeseries,
    plan_fleet,
    regional_figures,
)
from idlefleet.sim.run import SimResult, simulate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "region_rates.py"
DAY = 86_400.0
MONTH = 365.25 / 12 * DAY

# A hand-made run: 1,000 cars, 60 % in "north" and 40 % in "south"; a quarter opted in (the
# preemption and energy ratios both say 0.25); 100 cars computing on average; 8.64 trips per
# vehicle-day and 5.76 sessions per opted-in vehicle-day, chosen so that rates come out round.
CARS, OPTED, COMPUTING = 1000, 0.25, 100.0
TRIPS, SESSIONS = 8.64, 5.76
SHARES = {"north": 0.6, "south": 0.4}

# Only the terms a case is about: no event heartbeats, input or envelope bytes, or policy pushes.
BARE = TrafficAssumptions(
    event_heartbeats_per_trip=0,
    event_heartbeats_per_session=0,
    input_bytes_per_sentence=0,
    control_message_bytes=0,
    policy_changes_per_owner_month=0,
)
SMALL = ScaleLimits(
    nats_connections_per_node=100,
    nats_messages_per_node_s=1000,
    nats_bytes_per_node_s=1e8,
    nats_hops_per_message=2,
    coordinator_heartbeats_per_replica_s=10,
    coordinator_work_ops_per_replica_s=100,
    postgres_transactions_per_primary_s=100,
    postgres_write_bytes_per_primary_s=5e7,
)


def summary() -> dict[str, Any]:
    return {
        "run": {"vehicles": CARS, "days": 1},
        "calibration": {"parked_fraction": 0.96, "trips_per_vehicle_day": TRIPS},
        "compute": {"mean_computing_vehicles": COMPUTING},
        "windows": {"compute_sessions_per_opted_in_vehicle_day": SESSIONS},
        "preemption": {"per_vehicle_day": 0.5, "per_opted_in_vehicle_day": 2.0},
        "energy": {"compute_kwh_per_vehicle_day": 1.0, "compute_kwh_per_opted_in_vehicle_day": 4.0},
        "earnings": {"utilization": 1.0},
        "factors": {"source": "hand-made run"},
        "params": {
            "opt_in_rate": 0.3,
            "regions": [{"name": name, "share": share} for name, share in SHARES.items()],
        },
    }


def changed(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (default: `summary`) with the value at dotted ``path`` replaced (or removed)."""
    doc = copy.deepcopy(base or summary())
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is REMOVE:
        del node[last]
    else:
        node[last] = value
    return doc


REMOVE = object()


def expected_north(traffic: TrafficAssumptions = BARE) -> dict[str, float]:
    """North's rates worked out from the run's numbers and the assumptions, term by term."""
    cars = CARS * SHARES["north"]  # 600
    opted = cars * OPTED  # 150, all connected by default
    computing = cars * COMPUTING / CARS  # 60
    sentences = computing * 400  # 24,000 a second
    trips = opted * TRIPS / DAY  # 0.015 a second
    sessions = opted * SESSIONS / DAY  # 0.01 a second
    work = computing / 120 + sentences / 64 + sessions + trips  # leases, chunks, releases, regs
    heartbeats = opted / 30 + traffic.event_heartbeats_per_trip * trips
    heartbeats += traffic.event_heartbeats_per_session * sessions
    return {
        "connected_cars": opted,
        "heartbeats_per_s": heartbeats,
        "registrations_per_s": trips,
        "leases_per_s": computing / 120,
        "result_chunks_per_s": sentences / 64,
        "result_bytes_per_s": sentences * 1536 * 4 / 3,
        "releases_per_s": sessions,
        "nats_messages_per_s": 2 * (heartbeats + work),
        "durable_transactions_per_s": work + opted / 300 / 1000,
        "durable_bytes_per_s": sentences * (1536 + 2048),
    }


# -- hand-computed cases ---------------------------------------------------------------------


def test_rates_of_one_region_match_the_hand_computation() -> None:
    # Arrange
    figures = figures_from_summary(summary())

    # Act
    north = plan_fleet(figures, BARE, SMALL).regions[0]

    # Assert
    assert north.name == "north"
    for name, value in expected_north().items():
        assert getattr(north.peak, name) == pytest.approx(value, rel=1e-12), name
        assert getattr(north.mean, name) == pytest.approx(value, rel=1e-12), name
    assert north.peak.nats_bytes_per_s == pytest.approx(24_000 * 2048, rel=1e-12)


def test_servers_and_binding_limits_match_the_hand_computation() -> None:
    # Arrange
    north = expected_north()

    # Act
    plan = plan_fleet(figures_from_summary(summary()), BARE, SMALL).regions[0]

    # Assert: NATS: 150/100 connections = 1.5; 2 hops × 761.05 msgs/s / 1000 = 1.5221;
    # 2 × 49.152 MB/s / 100 MB/s = 0.983. Two nodes, messages bind.
    assert plan.nats.loads["connections"] == pytest.approx(1.5)
    assert plan.nats.loads["messages/s"] == pytest.approx(2 * north["nats_messages_per_s"] / 1000)
    assert plan.nats.loads["messages/s"] == pytest.approx(1.5221)
    assert plan.nats.loads["bytes/s"] == pytest.approx(0.98304)
    assert (plan.nats.servers, plan.nats.binding) == (2, "messages/s")
    # Coordinators: 5 heartbeats/s / 10 + 375.525 work ops/s / 100 = 4.255 → 5, work binds.
    assert plan.coordinators.demand == pytest.approx(0.5 + 3.75525)
    assert (plan.coordinators.servers, plan.coordinators.binding) == (5, "work ops/s")
    # PostgreSQL: 375.5255 tx/s / 100 = 3.755; 86.016 MB/s / 50 MB/s = 1.72 → 4, tx bind.
    assert plan.postgres.loads["transactions/s"] == pytest.approx(3.755255)
    assert plan.postgres.loads["bytes/s"] == pytest.approx(1.72032)
    assert (plan.postgres.servers, plan.postgres.binding) == (4, "transactions/s")
    assert plan.first_to_fail == "coordinator: work ops/s"


def test_total_adds_the_regions_and_their_servers() -> None:
    # Act
    plan = plan_fleet(figures_from_summary(summary()), BARE, SMALL)

    # Assert
    north, south = plan.regions
    assert plan.total.peak.cars == CARS
    assert plan.total.peak.connected_cars == pytest.approx(CARS * OPTED)
    assert plan.total.peak.heartbeats_per_s == pytest.approx(CARS * OPTED / 30)
    assert plan.total.peak.leases_per_s == pytest.approx(COMPUTING / 120)
    assert plan.total.peak.result_bytes_per_s == pytest.approx(COMPUTING * 400 * 2048)
    assert south.peak.leases_per_s == pytest.approx(40 / 120)
    assert plan.total.nats.servers == north.nats.servers + south.nats.servers
    assert plan.total.postgres.servers == north.postgres.servers + south.postgres.servers


def test_event_heartbeats_policy_pushes_and_envelopes_add_their_terms() -> None:
    # Arrange
    traffic = TrafficAssumptions(input_bytes_per_sentence=100, control_message_bytes=200)

    # Act
    north = plan_fleet(figures_from_summary(summary()), traffic, SMALL).regions[0].peak

    # Assert: 2 beats per trip and per session; one policy change per owner-month.
    hand = expected_north(traffic)
    pushes = 150 / MONTH
    assert north.heartbeats_per_s == pytest.approx(5 + 2 * 0.015 + 2 * 0.01)
    assert north.heartbeats_per_s == pytest.approx(hand["heartbeats_per_s"])
    assert north.policy_pushes_per_s == pytest.approx(pushes)
    messages = hand["nats_messages_per_s"] + 2 * pushes
    assert north.nats_messages_per_s == pytest.approx(messages)
    assert north.input_bytes_per_s == pytest.approx(24_000 * 100)
    assert north.nats_bytes_per_s == pytest.approx(24_000 * (2048 + 100) + 200 * messages)


def test_reconnecting_per_compute_session_registers_once_per_session() -> None:
    # Act
    traffic = BARE.model_copy(update={"reconnect_on": "compute_session"})
    north = plan_fleet(figures_from_summary(summary()), traffic, SMALL).regions[0].peak

    # Assert
    assert north.registrations_per_s == pytest.approx(150 * SESSIONS / DAY)


def test_every_car_connected_every_30_s_is_designs_3_3_million_messages() -> None:
    # Arrange: DESIGN.md: "100 M cars heartbeating every 30 s = 3.3 M messages/s".
    traffic = BARE.model_copy(update={"connected_share_not_opted_in": 1.0})

    # Act
    total = plan_fleet(figures_from_summary(summary()), traffic, SMALL, vehicles=1e8).total

    # Assert
    assert total.peak.connected_cars == pytest.approx(1e8)
    assert total.peak.heartbeats_per_s == pytest.approx(1e8 / 30)
    assert round(total.peak.heartbeats_per_s / 1e6, 1) == 3.3


def test_utilization_scales_compute_driven_rates_only() -> None:
    # Act
    half = BARE.model_copy(update={"utilization": 0.5})
    full = plan_fleet(figures_from_summary(summary()), BARE, SMALL).regions[0].peak
    north = plan_fleet(figures_from_summary(summary()), half, SMALL).regions[0].peak

    # Assert
    assert north.leases_per_s == pytest.approx(full.leases_per_s / 2)
    assert north.result_bytes_per_s == pytest.approx(full.result_bytes_per_s / 2)
    assert north.heartbeats_per_s == pytest.approx(full.heartbeats_per_s)
    assert north.computing_cars == pytest.approx(full.computing_cars)


def test_connections_are_never_fewer_than_cars_computing_at_the_peak() -> None:
    # Arrange
    traffic = BARE.model_copy(update={"connected_share_opted_in": 0.0})

    # Act
    plan = plan_fleet(figures_from_summary(summary()), traffic, SMALL)

    # Assert
    assert plan.regions[0].peak.connected_cars == pytest.approx(60)
    assert any("raised to the peak computing cars" in note for note in plan.notes)


def test_units_bigger_than_the_nats_payload_are_noted() -> None:
    # Act: 120 s × 400 sentences × 100 bytes = 4.8 MB of input per unit, above 1 MiB.
    big = plan_fleet(figures_from_summary(summary()), TrafficAssumptions(), ScaleLimits())
    small = plan_fleet(
        figures_from_summary(summary()),
        TrafficAssumptions(unit_compute_s=10),
        ScaleLimits(),
    )

    # Assert
    assert any("4,800,000 bytes of input" in note for note in big.notes)
    assert not any("bytes of input" in note for note in small.notes)


# -- peaks -----------------------------------------------------------------------------------


def series() -> dict[str, list[float]]:
    # Mean computing 100 (the summary's), peak 120; mean driving 1000 − 960 = 40, peak 60.
    return {"computing_vehicles": [80, 100, 120], "parked_vehicles": [980, 960, 940]}


def test_peaks_are_peak_over_mean_of_computing_and_driving_cars() -> None:
    # Act
    peaks = peaks_from_timeseries(series(), figures_from_summary(summary()))

    # Assert
    assert peaks.computing == pytest.approx(1.2)
    assert peaks.driving == pytest.approx(1.5)


def test_peaks_scale_compute_and_trip_driven_rates_but_not_heartbeats() -> None:
    # Arrange
    figures = figures_from_summary(summary())
    peaks = peaks_from_timeseries(series(), figures)

    # Act
    north = plan_fleet(figures, BARE, SMALL, peaks=peaks).regions[0]

    # Assert
    assert north.peak.leases_per_s == pytest.approx(60 * 1.2 / 120)
    assert north.peak.result_chunks_per_s == pytest.approx(60 * 1.2 * 400 / 64)
    assert north.peak.registrations_per_s == pytest.approx(150 * TRIPS / DAY * 1.5)
    assert north.peak.releases_per_s == pytest.approx(150 * SESSIONS / DAY * 1.5)
    assert north.peak.heartbeats_per_s == pytest.approx(150 / 30)
    assert north.mean.leases_per_s == pytest.approx(60 / 120)


def test_a_series_of_another_run_is_refused() -> None:
    # Arrange
    other = {**series(), "computing_vehicles": [10.0, 10.0, 10.0]}

    # Act / Assert
    with pytest.raises(RatesInputError, match="different runs"):
        peaks_from_timeseries(other, figures_from_summary(summary()))


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"parked_vehicles": [1.0]}, "no column 'computing_vehicles'"),
        ({"computing_vehicles": [], "parked_vehicles": []}, "is empty"),
        ({"computing_vehicles": ["x"], "parked_vehicles": [1]}, "not a number"),
        ({"computing_vehicles": [-1.0], "parked_vehicles": [1]}, "finite numbers >= 0"),
        ({"computing_vehicles": [100.0], "parked_vehicles": [1, 2]}, "different lengths"),
    ],
)
def test_bad_series_are_refused_with_the_column(table: dict[str, list[Any]], problem: str) -> None:
    with pytest.raises(RatesInputError, match=problem):
        peaks_from_timeseries(table, figures_from_summary(summary()))


# -- scaling and limits ----------------------------------------------------------------------


def test_every_rate_scales_linearly_with_the_fleet() -> None:
    # Arrange
    figures = figures_from_summary(summary())
    peaks = peaks_from_timeseries(series(), figures)

    # Act
    small = plan_fleet(figures, TrafficAssumptions(), ScaleLimits(), peaks=peaks)
    large = plan_fleet(figures, TrafficAssumptions(), ScaleLimits(), vehicles=1e8, peaks=peaks)

    # Assert
    for name in Rates.__dataclass_fields__:
        for a, b in ((small.total.peak, large.total.peak), (small.total.mean, large.total.mean)):
            assert getattr(b, name) == pytest.approx(getattr(a, name) * 1e5, rel=1e-9), name
    assert large.total.postgres.demand == pytest.approx(small.total.postgres.demand * 1e5)
    assert large.total.nats.servers >= small.total.nats.servers


def test_the_binding_limit_moves_when_a_limit_moves() -> None:
    # Arrange
    figures = figures_from_summary(summary())
    roomy = SMALL.model_copy(
        update={
            "coordinator_work_ops_per_replica_s": 1e6,
            "postgres_transactions_per_primary_s": 1e6,
            "nats_messages_per_node_s": 1e6,
        }
    )

    # Act
    before = plan_fleet(figures, BARE, SMALL).regions[0]
    after = plan_fleet(figures, BARE, roomy).regions[0]

    # Assert: with work ops, transactions and messages cheap, heartbeats (5/s ÷ 10 = 0.5),
    # stored bytes (1.72) and connections (1.5) bind; stored bytes now fail first.
    assert before.coordinators.binding == "work ops/s"
    assert after.coordinators.binding == "heartbeats/s"
    assert before.postgres.binding == "transactions/s"
    assert after.postgres.binding == "bytes/s"
    assert before.nats.binding == "messages/s"
    assert after.nats.binding == "connections"
    assert after.first_to_fail == "postgres: bytes/s"
    assert after.postgres.servers == math.ceil(24_000 * 3584 / 5e7)


# -- refused inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (changed("run.vehicles", REMOVE), "run.vehicles: missing"),
        (changed("run.vehicles", 0.5), "run.vehicles: must be a whole number"),
        (changed("compute.mean_computing_vehicles", -3), "mean_computing_vehicles: must be >= 0"),
        (changed("compute.mean_computing_vehicles", 5000), "more than run.vehicles"),
        (changed("compute.mean_computing_vehicles", "many"), "must be a finite number"),
        (changed("calibration.trips_per_vehicle_day", float("nan")), "must be a finite number"),
        (changed("calibration.parked_fraction", 1.5), "between 0 and 1"),
        (changed("params.regions.0.share", 0.9), "shares must add up to 1"),
        (changed("params.regions.0.share", -0.6), "params.regions.0.share: must be between"),
        (changed("params.regions.0.share", REMOVE), "params.regions.0.share: missing"),
        (changed("params.regions.1.name", "north"), "names must be unique"),
        (changed("params.regions", []), "non-empty list"),
        (changed("compute", [1, 2]), "compute.mean_computing_vehicles: missing"),
    ],
)
def test_bad_summaries_are_refused_naming_the_field(doc: dict[str, Any], problem: str) -> None:
    with pytest.raises(RatesInputError, match=problem):
        figures_from_summary(doc)


def test_a_summary_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(RatesInputError, match="expected a JSON object"):
        figures_from_summary(cast(Any, [1, 2, 3]))


def test_the_opted_in_share_falls_back_to_energy_then_the_rate() -> None:
    # Arrange
    no_preemption = changed("preemption.per_opted_in_vehicle_day", 0.0)
    nothing = changed("energy.compute_kwh_per_opted_in_vehicle_day", 0.0, no_preemption)

    # Act / Assert
    assert figures_from_summary(no_preemption).opted_in_share == pytest.approx(0.25)
    assert figures_from_summary(nothing).opted_in_share == pytest.approx(0.3)


@pytest.mark.parametrize(
    "fields",
    [{"heartbeat_interval_s": -1}, {"connected_share_opted_in": 1.5}, {"heartbeat_s": 30}],
)
def test_bad_assumptions_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TrafficAssumptions(**fields)


def test_bad_limits_and_fleet_sizes_are_refused() -> None:
    with pytest.raises(ValidationError):
        ScaleLimits(nats_connections_per_node=0)
    with pytest.raises(RatesInputError, match="vehicles"):
        plan_fleet(figures_from_summary(summary()), BARE, SMALL, vehicles=-1)
    with pytest.raises(RatesInputError, match="west: not a region"):
        plan_fleet(
            figures_from_summary(summary()),
            BARE,
            SMALL,
            regional={"west": (figures_from_summary(summary()), Peaks())},
        )


# -- a region's own run ----------------------------------------------------------------------


def north_alone(**params: Any) -> dict[str, Any]:
    doc = changed("params.regions", [{"name": "north", "share": 1.0}])
    doc["compute"]["mean_computing_vehicles"] = 200.0
    doc["params"].update(params)
    return doc


def test_a_region_run_replaces_that_regions_figures_and_peaks() -> None:
    # Arrange
    fleet = summary()
    figures = regional_figures(fleet, north_alone(), "north")

    # Act
    plan = plan_fleet(
        figures_from_summary(fleet),
        BARE,
        SMALL,
        regional={"north": (figures, Peaks(computing=2.0))},
    )

    # Assert: north computes 20 % of its 600 cars, twice that at its peak; south is unchanged.
    north, south = plan.regions
    assert north.peak.computing_cars == pytest.approx(600 * 0.2 * 2)
    assert north.mean.leases_per_s == pytest.approx(600 * 0.2 / 120)
    assert south.peak.computing_cars == pytest.approx(40)


@pytest.mark.parametrize(
    ("region", "doc", "problem"),
    [
        ("north", north_alone(opt_in_rate=0.5), "params opt_in_rate differ"),
        ("south", north_alone(), "must model that one region"),
        ("north", changed("params.regions.0.utc_offset_h", 3, north_alone()), "regions\\[north\\]"),
        ("north", summary(), "must model that one region"),
    ],
)
def test_a_region_run_of_another_model_is_refused(
    region: str, doc: dict[str, Any], problem: str
) -> None:
    with pytest.raises(RatesInputError, match=problem):
        regional_figures(summary(), doc, region)


# -- the script --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("region_rates", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(
    script: ModuleType, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    try:
        code = script.main(list(argv))
    except SystemExit as exited:  # argparse refuses a flag by exiting
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def sim_dir(tmp_path: Path, doc: object, name: str = "run") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (folder / "summary.json").write_text(text, encoding="utf-8")
    return folder


def test_the_script_has_a_flag_for_every_assumption_and_limit(script: ModuleType) -> None:
    # Act
    flags = {
        option for action in script.build_parser()._actions for option in action.option_strings
    }

    # Assert
    for model in (TrafficAssumptions, ScaleLimits):
        for name in model.model_fields:
            assert "--" + name.replace("_", "-") in flags


def test_the_script_prints_every_region_and_writes_json(
    script: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange
    folder = sim_dir(tmp_path, summary())
    out_json = tmp_path / "plan.json"

    # Act
    code, out, err = run_script(
        script, capsys, "--sim-out", str(folder), "--vehicles", "1e6", "--json", str(out_json)
    )

    # Assert
    assert (code, err) == (0, "")
    assert "north" in out and "south" in out and "total" in out
    plan = json.loads(out_json.read_text())
    assert plan["vehicles"] == 1e6
    assert plan["total"]["peak"]["connected_cars"] == pytest.approx(1e6 * OPTED)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "summary.json: not found"),
        ("{not json", "summary.json: not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (changed("compute.mean_computing_vehicles", -1), "mean_computing_vehicles: must be >= 0"),
    ],
)
def test_the_script_exits_2_on_a_bad_summary(
    script: ModuleType,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: object,
    problem: str,
) -> None:
    # Arrange
    folder = tmp_path / "empty" if content is None else sim_dir(tmp_path, content)
    folder.mkdir(exist_ok=True)

    # Act
    code, _, err = run_script(script, capsys, "--sim-out", str(folder))

    # Assert
    assert code == 2
    assert problem in err


def test_the_script_exits_2_on_a_time_series_of_another_run(
    script: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange
    folder = sim_dir(tmp_path, summary())
    with (folder / "timeseries.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["computing_vehicles", "parked_vehicles"], [5, 960]])

    # Act
    code, _, err = run_script(script, capsys, "--sim-out", str(folder))

    # Assert
    assert code == 2
    assert "timeseries.csv: timeseries: mean computing_vehicles" in err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (
            ["--heartbeat-interval-s", "-1"],
            "--heartbeat-interval-s: Input should be greater than 0",
        ),
        (["--connected-share-opted-in", "2"], "--connected-share-opted-in"),
        (["--nats-connections-per-node", "nan"], "must be a finite number"),
        (["--vehicles", "-5"], "must be at least 1"),
        (["--reconnect-on", "never"], "invalid choice"),
        (["--computing-peak-to-mean", "0.5"], "must be at least 1"),
        (["--region-sim-out", "north"], "expected NAME=DIR"),
    ],
)
def test_the_script_exits_2_on_a_bad_flag(
    script: ModuleType,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    problem: str,
) -> None:
    # Act
    code, _, err = run_script(script, capsys, "--sim-out", str(sim_dir(tmp_path, summary())), *argv)

    # Assert
    assert code == 2
    assert problem in err


# -- end to end on a real run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimResult, Path]:
    """What ``idlefleet sim --vehicles 20000 --days 1 --out DIR`` writes, through its API."""
    result = simulate(SimParams.build(vehicles=20_000, days=1), workers=1)
    folder = tmp_path_factory.mktemp("sim-out")
    write_outputs(result, folder)
    return result, folder


def test_the_script_on_a_real_run_agrees_with_the_runs_own_numbers(
    real_run: tuple[SimResult, Path], tmp_path: Path
) -> None:
    # Arrange
    result, folder = real_run
    out_json = tmp_path / "plan.json"
    scale = 1e8 / 20_000
    bare = ["--event-heartbeats-per-trip", "0", "--event-heartbeats-per-session", "0"]

    # Act
    argv = [str(SCRIPT), "--sim-out", str(folder), "--vehicles", "1e8", *bare]
    done = subprocess.run(
        [sys.executable, *argv, "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert: counts straight from the tally and the series, not from the summary's ratios.
    assert done.returncode == 0, done.stderr
    total = json.loads(out_json.read_text())["total"]
    tally, summary_doc = result.tally, result.summary()
    opted = tally.opted_in_vehicles * scale
    computing = summary_doc["compute"]["mean_computing_vehicles"] * scale
    series = result.timeseries()["computing_vehicles"]
    assert total["mean"]["cars"] == pytest.approx(1e8)
    assert total["mean"]["connected_cars"] == pytest.approx(opted)
    assert total["mean"]["heartbeats_per_s"] == pytest.approx(opted / 30)
    assert total["mean"]["registrations_per_s"] == pytest.approx(
        opted * tally.trips / tally.vehicle_days / DAY
    )
    assert total["mean"]["computing_cars"] == pytest.approx(tally.compute_min / 1440 * scale)
    assert total["mean"]["leases_per_s"] == pytest.approx(computing / 120)
    assert total["mean"]["releases_per_s"] == pytest.approx(tally.sessions * scale / DAY)
    assert total["mean"]["result_bytes_per_s"] == pytest.approx(computing * 400 * 2048)
    # The series counts whole minutes while the summary's mean counts fractions of them, and
    # the CSV keeps six significant digits: the peak agrees to a few parts in 10⁵.
    assert total["peak"]["computing_cars"] == pytest.approx(series.max() * scale, rel=2e-4)
    for region in ("us-west", "us-east", "europe", "china", "australia"):
        assert region in done.stdout

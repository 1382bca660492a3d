"""``idlefleet owner`` against the real coordinator app over HTTP (see ``live.py``)."""

from __future__ import annotations

import argparse
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from pydantic import ValidationError

from idlefleet.cli.main import main
from idlefleet.cli.owner import API_KEY_ENV, DEFAULT_COORDINATOR, _policy_file
from idlefleet.cli.up import DEFAULT_PORT
from idlefleet.protocol.policy import OwnerPolicy
from tests.coordinator.api.live import LiveCoordinator, live_coordinator
from tests.fuzzing import fuzz_settings
from tests.hostile import spoiled

_ids = itertools.count()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path_factory.mktemp("owner-cli")) as running:
        yield running


@pytest.fixture
def car(live: LiveCoordinator) -> str:
    """A fresh car per test, enrolled under alice."""
    live.pushes.clear()
    live.push_answer = True
    vehicle_id = f"cli-car-{next(_ids)}"
    live.enrol(vehicle_id)
    return vehicle_id


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a test about the environment variable sets it; the caller's shell never leaks in."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def owner(live: LiveCoordinator, *argv: str, key: str = "alice") -> int:
    """``idlefleet owner ...`` against ``live`` with the API key named ``key``."""
    return main(["owner", *argv, "--coordinator", live.base_url, "--api-key", live.keys[key]])


def test_the_default_coordinator_is_where_idlefleet_up_listens() -> None:
    assert f"http://127.0.0.1:{DEFAULT_PORT}" == DEFAULT_COORDINATOR


def test_show_of_a_new_car_says_it_is_opted_out(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = owner(live, "show", "--vehicle", car)

    out = capsys.readouterr().out
    assert code == 0
    assert "policy version    0 (never set" in out
    assert "opted in          no" in out
    assert "charge floor      50 %" in out


def test_opt_in_with_purposes_and_regions_then_opt_out_are_recorded(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str]
) -> None:
    opted_in = owner(
        live,
        "opt-in",
        "--vehicle",
        car,
        "--purposes",
        "research,healthcare",
        "--regions",
        "eu,global",
    )
    in_out = capsys.readouterr().out
    live.push_answer = False
    opted_out = owner(live, "opt-out", "--vehicle", car, key="operator")
    out_out = capsys.readouterr().out
    history = owner(live, "history", "--vehicle", car)
    table = capsys.readouterr().out.splitlines()

    assert (opted_in, opted_out, history) == (0, 0, 0)
    assert "opted in (purposes: research, healthcare; data regions: eu, global)" in in_out
    assert "policy version 1; pushed to the car" in in_out
    assert "opted out, policy version 2; the car was not reached" in out_out
    policy = live.work.owners.current(car).policy
    assert (policy.opted_in, policy.purposes, policy.data_regions) == (
        False,
        ["research", "healthcare"],
        ["eu", "global"],
    )
    assert len(table) == 3
    assert table[1].split()[0] == "1" and "owner:alice" in table[1] and "opted in" in table[1]
    assert table[2].split()[0] == "2" and "operator:ops" in table[2] and "opted out" in table[2]


def test_set_policy_from_a_file_and_show_json_round_trips(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.json"
    policy = OwnerPolicy(opted_in=True, soc_floor_percent=65, allowed_hours=["22:00-06:00"])
    policy_file.write_text(policy.model_dump_json())

    set_code = owner(live, "set-policy", "--vehicle", car, "--file", str(policy_file))
    set_out = capsys.readouterr().out
    show_code = owner(live, "show", "--vehicle", car, "--json")
    shown = capsys.readouterr().out
    (tmp_path / "shown.json").write_text(shown)
    again = owner(live, "set-policy", "--vehicle", car, "--file", str(tmp_path / "shown.json"))
    capsys.readouterr()

    assert (set_code, show_code, again) == (0, 0, 0)
    assert "policy set, policy version 1" in set_out
    assert "allowed hours     22:00-06:00" in set_out
    body = json.loads(shown)
    assert (body["vehicle_id"], body["version"], body["actor"]) == (car, 1, "owner:alice")
    assert OwnerPolicy.model_validate(body["policy"]) == policy
    assert live.work.owners.current(car).version == 2
    assert live.work.owners.current(car).policy == policy


def test_a_refused_policy_prints_the_coordinators_reason_and_exits_1(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"opted_in": True, "soc_floor_percent": 140}))

    code = owner(live, "set-policy", "--vehicle", car, "--file", str(policy_file))

    err = capsys.readouterr().err
    assert code == 1
    assert "refused (400): policy.soc_floor_percent: Input should be less than or equal to 100" in (
        err
    )
    assert live.work.owners.current(car).version == 0


def test_an_unreachable_coordinator_is_a_clear_error_with_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    code = main(
        [
            *("owner", "show", "--vehicle", "car-1", "--api-key", "ifk_o_anything"),
            *("--coordinator", f"http://127.0.0.1:{port}"),
        ]
    )

    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot reach the coordinator at http://127.0.0.1:{port}" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["show", "--vehicle", "bad id"], "vehicle id"),
        (["show"], "--vehicle"),
        # Who made a change is the API key's business now, never a flag's.
        (["opt-in", "--vehicle", "c", "--actor", "owner:a"], "unrecognized arguments: --actor"),
        (["opt-in", "--vehicle", "c", "--purposes", "mining"], "unknown purpose"),
        (["opt-in", "--vehicle", "c", "--regions", "eu,mars"], "mars"),
        (["opt-out", "--vehicle", "c", "--purposes", "research"], "unrecognized"),
        (["set-policy", "--vehicle", "c", "--file", "/nope.json"], "cannot read"),
        (["show", "--vehicle", "c", "--coordinator", "ftp://x"], "coordinator URL"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_before_any_request(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["owner", *argv])

    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "{opted_in: yes",
        # These two ended in a traceback (RecursionError, the 4,300-digit limit's ValueError):
        "[" * 100_000 + "]" * 100_000,
        '{"soc_floor_percent": 1' + "0" * 5_000 + "}",
    ],
    ids=["not-json", "nested", "5000-digits"],
)
def test_a_policy_file_that_is_not_json_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    broken = tmp_path / "policy.json"
    broken.write_text(text)

    with pytest.raises(SystemExit) as exited:
        main(["owner", "set-policy", "--vehicle", "c", "--file", str(broken)])

    assert exited.value.code == 2
    assert "is not JSON" in capsys.readouterr().err


# -- the API key --------------------------------------------------------------------------------


def test_the_key_comes_from_the_environment_when_no_flag_gives_it(
    live: LiveCoordinator,
    car: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(API_KEY_ENV, live.keys["alice"] + "\n")  # as `$(cat key.txt)` gives it

    code = main(["owner", "opt-in", "--vehicle", car, "--coordinator", live.base_url])

    assert code == 0
    assert "opted in" in capsys.readouterr().out
    assert live.work.owners.current(car).actor == "owner:alice"


def test_the_flag_wins_over_the_environment(
    live: LiveCoordinator,
    car: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(API_KEY_ENV, live.keys["bob"])

    code = owner(live, "opt-in", "--vehicle", car, key="alice")

    assert code == 0
    assert live.work.owners.current(car).actor == "owner:alice"


@pytest.mark.parametrize("command", ["show", "opt-in", "opt-out", "history"])
def test_without_a_key_the_command_exits_2_naming_both_ways_to_give_one(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code = main(["owner", command, "--vehicle", car, "--coordinator", live.base_url])

    err = capsys.readouterr().err
    assert code == 2
    assert f"idlefleet owner {command}: no API key" in err
    assert "--api-key" in err and API_KEY_ENV in err
    assert live.work.owners.current(car).version == 0


def test_a_wrong_key_is_refused_with_401_and_a_hint(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            *("owner", "opt-in", "--vehicle", car, "--coordinator", live.base_url),
            *("--api-key", "ifk_o_not-a-key-the-coordinator-ever-made"),
        ]
    )

    err = capsys.readouterr().err
    assert code == 1
    assert "refused (401): Incorrect API key provided" in err
    assert f"is --api-key or ${API_KEY_ENV} right?" in err
    assert "not-a-key-the-coordinator-ever-made" not in err  # the coordinator redacts it
    assert live.work.owners.current(car).version == 0


@pytest.mark.parametrize("command", ["show", "opt-in", "history"])
def test_another_owners_car_is_not_found(
    live: LiveCoordinator, car: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code = owner(live, command, "--vehicle", car, key="bob")

    err = capsys.readouterr().err
    assert code == 1
    assert f"refused (404): No vehicle '{car}' is enrolled under your name." in err
    assert live.work.owners.current(car).version == 0


# -- hostile policy files (hypothesis) ------------------------------------------------------------


@pytest.mark.fuzz
@fuzz_settings(150)
@given(
    content=spoiled(
        {
            "opted_in": True,
            "charging_only": True,
            "soc_floor_percent": 40,
            "timezone": "Europe/Berlin",
            "allowed_hours": ["22:00-07:00"],
            "departure_time": "07:30",
            "purposes": ["research"],
            "data_regions": ["eu"],
        }
    )
)
def test_any_policy_file_is_read_or_refused_with_its_reason(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "policy.json"
    path.write_bytes(content)

    try:
        loaded = _policy_file(str(path))
    except argparse.ArgumentTypeError as refused:
        assert str(path) in str(refused)
        return
    # What the coordinator does with it (PUT .../policy): a policy, or a ValidationError.
    try:
        OwnerPolicy.model_validate(loaded)
    except ValidationError as invalid:
        assert invalid.errors()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read CA file"), (b"not a certificate", "holds no PEM certificate")],
)
def test_a_ca_file_that_is_missing_or_not_pem_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["owner", "show", "--vehicle", "car-1", "--api-key", "k", "--ca-file", str(ca)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err

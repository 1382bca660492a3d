"""``idlefleet keys`` (on a real store) and ``idlefleet cars`` (against the real coordinator app
over HTTP, see ``live.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from idlefleet.cli.main import main
from idlefleet.cli.owner import API_KEY_ENV
from idlefleet.coordinator.access import DEFAULT_QUOTAS, Role, hash_secret
from idlefleet.coordinator.store import open_store, sqlite_url
from idlefleet.protocol.identity import new_nkey_seed, public_nkey
from tests.coordinator.api.live import LiveCoordinator, live_coordinator


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path_factory.mktemp("admin-cli")) as running:
        yield running


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def test_a_key_is_made_in_the_store_shown_once_listed_and_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_url = sqlite_url(tmp_path / "c.db")

    created = main(
        [
            *("keys", "create", "--store", store_url, "--role", "customer"),
            *("--principal", "acme", "--requests-per-minute", "5", "--json"),
        ]
    )
    shown = json.loads(capsys.readouterr().out)
    listed = main(["keys", "list", "--store", store_url, "--json"])
    keys = json.loads(capsys.readouterr().out)
    revoked = main(["keys", "revoke", "--store", store_url, shown["id"]])
    again = main(["keys", "revoke", "--store", store_url, shown["id"]])

    assert (created, listed, revoked, again) == (0, 0, 0, 1)
    assert shown["secret"].startswith("ifk_c_") and shown["requests_per_minute"] == 5
    # The limits not given keep the role's defaults (not "unlimited").
    defaults = DEFAULT_QUOTAS[Role.CUSTOMER]
    assert (shown["tokens_per_minute"], shown["queued_requests"]) == (
        defaults.tokens_per_minute,
        defaults.queued_requests,
    )
    assert [k["id"] for k in keys] == [shown["id"]] and "secret" not in keys[0]
    store = open_store(store_url)
    try:
        record = store.api_key_by_hash(hash_secret(shown["secret"]))
        assert record is not None and record.revoked_at is not None
        assert shown["secret"].encode() not in (tmp_path / "c.db").read_bytes()
    finally:
        store.close()


def test_a_bad_principal_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_url = sqlite_url(tmp_path / "c.db")
    code = main(
        ["keys", "create", "--store", store_url, "--role", "owner", "--principal", "x" * 101]
    )
    assert code == 2 and "principal" in capsys.readouterr().err


def test_cars_are_enrolled_listed_and_revoked_through_the_operator_api(
    live: LiveCoordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    nkey = public_nkey(new_nkey_seed())
    common = ["--coordinator", live.base_url, "--api-key", live.keys["operator"]]

    enrolled = main(
        ["cars", "enrol", "--vehicle", "cli-car", "--nkey", nkey, "--owner", "alice", *common]
    )
    out = capsys.readouterr().out
    listed = main(["cars", "list", "--json", *common])
    found = json.loads(capsys.readouterr().out)["data"]
    revoked = main(["cars", "revoke", "--vehicle", "cli-car", *common])
    after = capsys.readouterr().out

    assert (enrolled, listed, revoked) == (0, 0, 0)
    assert "cli-car: enrolled (owner alice)" in out
    assert {"vehicle_id": "cli-car", "nkey": nkey, "owner": "alice"}.items() <= next(
        e for e in found if e["vehicle_id"] == "cli-car"
    ).items()
    assert "cli-car: revoked" in after


def test_an_owner_key_cannot_enrol_cars(
    live: LiveCoordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    nkey = public_nkey(new_nkey_seed())
    code = main(
        [
            *("cars", "enrol", "--vehicle", "cli-x", "--nkey", nkey, "--owner", "alice"),
            *("--coordinator", live.base_url, "--api-key", live.keys["alice"]),
        ]
    )
    assert code == 1 and "refused (403)" in capsys.readouterr().err


def test_cars_without_a_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cars", "list"]) == 2
    assert API_KEY_ENV in capsys.readouterr().err

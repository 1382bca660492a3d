"""TLS as a switch: the whole fleet (HTTPS API, nats-server, coordinator and agent connections)
with certificates from a CA this test makes, and refusals for clients that do not use it or do
not trust it."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from openai import DefaultHttpxClient, OpenAI

from idlefleet.cli.demo import batch_input
from idlefleet.cli.main import main
from idlefleet.cli.owner import CA_FILE_ENV
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.embedded.tls import TlsFiles, client_context, make_local_tls
from tests.integration.conftest import read_jsonl, submit, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_local_tls(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(data_dir=tmp_path_factory.mktemp("tls-fleet"), agents=1, tls=tls)
    with EmbeddedFleet(options) as running:
        yield running


def test_a_batch_runs_over_https_and_nats_tls(fleet: EmbeddedFleet, tls: TlsFiles) -> None:
    assert fleet.base_url.startswith("https://")
    with OpenAI(
        base_url=f"{fleet.base_url}/v1",
        api_key=fleet.api_key,
        max_retries=0,
        http_client=DefaultHttpxClient(verify=client_context(tls.ca)),
    ) as client:
        batch = wait_for(client, submit(client, batch_input(["over", "tls"])).id, 120)
        assert batch.status == "completed"
        assert batch.output_file_id is not None
        lines = read_jsonl(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == ["req-0", "req-1"]


def test_plain_http_and_untrusted_https_are_refused(fleet: EmbeddedFleet, tls: TlsFiles) -> None:
    plain = fleet.base_url.replace("https://", "http://") + "/healthz"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=5)
    address = urlsplit(fleet.base_url)
    assert address.hostname is not None and address.port is not None
    assert untrusted_handshake(address.hostname, address.port, after_info=False) == (
        "certificate verify failed"
    )
    with urllib.request.urlopen(
        fleet.base_url + "/healthz", timeout=5, context=client_context(tls.ca)
    ) as trusted:
        assert trusted.status == 200


def test_nats_requires_tls_and_a_client_must_trust_the_ca(fleet: EmbeddedFleet) -> None:
    host, port = urlsplit(fleet.nats_url).hostname, urlsplit(fleet.nats_url).port
    assert host is not None and port is not None
    # A client that speaks plain NATS is told TLS is required and gets no further.
    with socket.create_connection((host, port), timeout=5) as plain:
        info = plain.recv(4096)
        plain.sendall(b"CONNECT {}\r\nPING\r\n")
        answer = plain.recv(4096)
    assert b'"tls_required":true' in info
    assert b"PONG" not in answer  # the server closes the connection (or says why first)
    # One that trusts only the system's CAs refuses our server's certificate.
    assert untrusted_handshake(host, port, after_info=True) == "certificate verify failed"


def untrusted_handshake(host: str, port: int, after_info: bool) -> str:
    """A TLS handshake trusting only the system's CAs: what went wrong."""
    with socket.create_connection((host, port), timeout=5) as raw:
        if after_info:
            raw.recv(4096)  # NATS sends INFO in plain text, then the client upgrades
        context = ssl.create_default_context()
        with context.wrap_socket(
            raw, server_hostname=host, do_handshake_on_connect=False
        ) as tls_socket:
            try:
                tls_socket.do_handshake()
            except ssl.SSLCertVerificationError:
                return "certificate verify failed"
    return "trusted"


def test_the_ca_file_is_what_the_fleet_reports(fleet: EmbeddedFleet, tls: TlsFiles) -> None:
    assert fleet.ca_file == tls.ca and Path(tls.key).stat().st_mode & 0o077 == 0


def test_the_operator_cli_trusts_the_private_ca_only_when_told(
    fleet: EmbeddedFleet, tls: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["cars", "list", "--json", "--coordinator", fleet.base_url]
    common += ["--api-key", fleet.keys["operator"]]

    untrusted = main(common)
    refusal = capsys.readouterr().err
    trusted = main([*common, "--ca-file", str(tls.ca)])
    found = json.loads(capsys.readouterr().out)["data"]

    assert untrusted == 1
    assert "certificate we do not trust" in refusal and "--ca-file" in refusal
    assert trusted == 0
    assert [e["vehicle_id"] for e in found] == ["car-001"]


def test_the_ca_file_may_come_from_the_environment(
    fleet: EmbeddedFleet,
    tls: TlsFiles,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CA_FILE_ENV, str(tls.ca))
    code = main(["cars", "list", "--coordinator", fleet.base_url, "--api-key", fleet.keys["owner"]])
    assert code == 0 and "car-001" in capsys.readouterr().out

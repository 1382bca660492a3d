"""The local CA and certificate `idlefleet up --tls` makes (`embedded/tls.py`)."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from idlefleet.embedded.tls import client_context, make_local_tls


def test_the_certificate_is_kept_while_it_serves_and_remade_for_another_host(
    tmp_path: Path,
) -> None:
    first = make_local_tls(tmp_path)
    made = first.cert.read_bytes()

    again = make_local_tls(tmp_path)
    kept = again.cert.read_bytes() == made
    other = make_local_tls(tmp_path, ("127.0.0.1", "coordinator.internal"))

    assert kept
    cert = x509.load_pem_x509_certificate(other.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"127.0.0.1", "coordinator.internal"}
    assert first.key.stat().st_mode & 0o077 == 0  # the private key is the owner's only


def test_the_client_context_trusts_the_ca_and_checks_host_names(tmp_path: Path) -> None:
    context = client_context(make_local_tls(tmp_path).ca)

    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname

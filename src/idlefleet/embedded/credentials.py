"""The embedded fleet's secrets: API keys, the coordinators' and the cars' nkey seeds.

What an operator does once by hand in a deployment, the embedded fleet does at start, on the
production paths: API keys are made in the store (as ``idlefleet keys create`` does), the
NATS accounts file is rendered from the store's enrolments (as a coordinator's `AuthSync`
does) before nats-server first reads it, and every secret is a file of mode 0600 under
``<data dir>/secrets``. A restart on the same data directory reuses them all, so cars enrolled
before connect again at once; a key that was revoked meanwhile is replaced.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.coordinator.access import Role, hash_secret, new_api_key
from idlefleet.coordinator.nats_auth import (
    CloudUsers,
    active_cars,
    render_authorization,
    write_atomically,
)
from idlefleet.coordinator.store import open_store
from idlefleet.models.manifest import generate_signing_key, load_private_key, public_key_pem
from idlefleet.protocol.identity import load_or_create_seed, public_nkey

__all__ = ["OWNER", "FleetSecrets", "prepare_security"]

OWNER = "embedded-fleet"
"""The owner every embedded car is enrolled under (and who consents for it)."""

KEYS = {
    # name -> (role, principal)
    "operator": (Role.OPERATOR, "embedded-operator"),
    "owner": (Role.OWNER, OWNER),
    "customer": (Role.CUSTOMER, "demo"),
}


class FleetSecrets:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def coordinator_seed_file(self) -> Path:
        return self.folder / "coordinator.nk"

    def coordinator_seed(self) -> str:
        return load_or_create_seed(self.coordinator_seed_file)

    @property
    def publisher_seed_file(self) -> Path:
        return self.folder / "models-publisher.nk"

    def publisher_seed(self) -> str:
        """The model publisher's seed: the one user of the MODELS account."""
        return load_or_create_seed(self.publisher_seed_file)

    def car_seed_file(self, vehicle_id: str) -> Path:
        return self.folder / "cars" / f"{vehicle_id}.nk"

    def car_seed(self, vehicle_id: str) -> str:
        return load_or_create_seed(self.car_seed_file(vehicle_id))

    @property
    def keys_file(self) -> Path:
        return self.folder / "api-keys.json"

    @property
    def signing_public_key_file(self) -> Path:
        return self.folder / "model-signing.pub.pem"

    def signing_key(self) -> Ed25519PrivateKey:
        """The operator's model-signing key (made once), with its public half beside it: what
        the coordinators and cars trust."""
        private = self.folder / "model-signing.pem"
        key = load_private_key(private) if private.exists() else generate_signing_key(private)
        if not self.signing_public_key_file.exists():
            self.signing_public_key_file.write_bytes(public_key_pem(key))
        return key


def prepare_security(store_url: str, secrets: FleetSecrets, auth_file: Path) -> dict[str, str]:
    """Make (or reuse) the fleet's API keys and write nats-server's accounts file; returns
    the key secrets by name (``operator``, ``owner``, ``customer``)."""
    store = open_store(store_url)
    try:
        keys: dict[str, str] = {}
        if secrets.keys_file.exists():
            keys = json.loads(secrets.keys_file.read_text())
        for name, (role, principal) in KEYS.items():
            record = store.api_key_by_hash(hash_secret(keys[name])) if name in keys else None
            if record is None or record.revoked_at is not None:
                keys[name], record = new_api_key(role, principal, f"embedded {name}")
                store.put_api_key(record)
        _write_private(secrets.keys_file, json.dumps(keys, indent=2) + "\n")
        cloud = CloudUsers(
            coordinator=public_nkey(secrets.coordinator_seed()),
            publisher=public_nkey(secrets.publisher_seed()),
        )
        cars = active_cars(store.enrolments(), now=time.time())
        write_atomically(auth_file, render_authorization(cloud, cars))
    finally:
        store.close()
    return keys


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)

"""The NATS server's authorization: one nkey user per enrolled car, confined to its subjects.

Static configuration plus a reload, chosen over JWTs and over auth callout:

* no operator/account JWT tooling (``nsc``) and no second source of truth: the store's
  enrolments are rendered into an ``include`` file, and ``SIGHUP`` makes nats-server reload
  it; a removed user's connection is closed by the reload itself, so revocation takes effect
  at once (the issue asks for one heartbeat interval);
* no service on the connect path: with auth callout every car's (re)connect is a request to a
  coordinator, so a NATS node restart with 10,000 cars becomes 10,000 callouts at once;
* the cost: the file holds one block per car (~400 bytes: 4 MB for 10,000 cars) and a reload
  re-reads it. Beyond ~100,000 cars per server, JWTs with subject templates
  (``{{name()}}``) are the next step; nothing else in the protocol changes.

Two accounts (`render_authorization`): ``MODELS`` holds JetStream and the models object store
(its user is the model publisher); ``FLEET`` holds the coordinators (all subjects) and the cars
(their own subjects, and direct gets of the models stream, imported from ``MODELS``). The
server refuses a connection without credentials, with an unknown or revoked key, or with a
signature that does not match (a forged key), and a car's publish or subscription outside its
subjects; it logs each, and
`idlefleet.coordinator.nats_log` counts them for the fleet API. `render_authorization` is
pure; `AuthSync` writes the file when the enrolments change (or an enrolment expires) and
signals every server named by its pid files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from idlefleet.coordinator.store import Enrolment, Store
from idlefleet.models.cache import atomic_write
from idlefleet.protocol.identity import is_user_nkey
from idlefleet.protocol.subjects import car_subjects, is_valid_vehicle_id

__all__ = ["AuthSync", "CloudUsers", "active_cars", "render_authorization"]

log = logging.getLogger(__name__)

MODELS_STREAM = "OBJ_idlefleet-models"
"""The JetStream stream behind the models object store (``idlefleet-models``)."""


DIRECT_GET = f"$JS.API.DIRECT.GET.{MODELS_STREAM}"
"""The one subject of the models stream's API a car (and a coordinator) may use: direct gets
of an object's metadata and chunks (`idlefleet.models.distribution.ModelBucket`). No stream
info, no stream-name lookup and above all no consumer create: nats-server does not check a push
consumer's deliver subject against its creator's permissions, so a car that may create
consumers can have the whole stream pushed onto any subject."""


@dataclass(frozen=True)
class CloudUsers:
    """Public nkeys of the cloud side: the coordinators (every subject of ``FLEET``) and the
    model publisher (the ``MODELS`` account, where the models stream lives)."""

    coordinator: str
    publisher: str = ""
    """Empty: nobody may publish models (the account still holds and exports them)."""


def active_cars(enrolments: Iterable[Enrolment], now: float) -> list[Enrolment]:
    """Enrolments that may connect now: not revoked, not expired, and well-formed (a row that
    is not — written around the API — is left out and logged, never let into the config)."""
    found = []
    for e in enrolments:
        if e.revoked_at is not None or (e.expires_at is not None and e.expires_at <= now):
            continue
        if not (is_valid_vehicle_id(e.vehicle_id) and is_user_nkey(e.nkey)):
            log.error("enrolment %r with nkey %r is malformed; left out", e.vehicle_id, e.nkey)
            continue
        found.append(e)
    return found


def render_authorization(cloud: CloudUsers, cars: Sequence[Enrolment]) -> str:
    """The ``accounts`` block of nats-server's config (for an ``include``).

    Two accounts. ``MODELS`` holds JetStream and the models object store, and its one user is
    the model publisher; it exports only the stream's direct gets. ``FLEET`` holds the
    coordinators and the cars, imports those direct gets, and has no JetStream at all: a car
    chooses its messages' reply subjects, and JetStream answers a direct get on the reply
    subject it is given, so with JetStream in the cars' account a car could aim an answer at
    ``$JS.API.STREAM.DELETE.…`` and delete the stream. Across the import the answer is
    published in ``FLEET``, where no JetStream API listens. (An answer aimed at another car's
    subject still arrives there, as for any request a car may send; it is refused as
    garbage.)"""
    lines = [
        "# written by idlefleet from the store's enrolments; edits are overwritten",
        "accounts {",
        "  MODELS {",
        "    jetstream: enabled",
        f"    users = [ {{ nkey: {_quoted(cloud.publisher)} }} ]"
        if cloud.publisher
        else "    users = [ ]",
        f'    exports = [ {{ service: "{DIRECT_GET}", response_type: stream, '
        "accounts: [FLEET] } ]",
        "  }",
        "  FLEET {",
        f'    imports = [ {{ service: {{ account: MODELS, subject: "{DIRECT_GET}" }} }} ]',
        "    users = [",
        f"      {{ nkey: {_quoted(cloud.coordinator)} }}",
    ]
    for car in cars:
        publish, subscribe = car_subjects(car.vehicle_id)
        permissions = {
            "publish": {"allow": [*publish, DIRECT_GET]},
            "subscribe": {"allow": subscribe},
        }
        lines.append(
            f"      {{ nkey: {_quoted(car.nkey)}, permissions: {json.dumps(permissions)} }}"
        )
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def _quoted(nkey: str) -> str:
    if not is_user_nkey(nkey):  # the store checked it; the config file must never break
        raise ValueError(f"not a public user nkey: {nkey!r}")
    return json.dumps(nkey)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())


class AuthSync:
    """Keeps the auth include file equal to the store's active enrolments."""

    def __init__(
        self,
        store: Store,
        cloud: CloudUsers,
        path: Path,
        pid_files: Sequence[Path],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cloud = cloud
        self.path = path
        self.pid_files = list(pid_files)
        self.clock = clock
        self._revision: tuple[int, int, float, float] | None = None
        self._expiring: list[Enrolment] = []
        self.reloads = 0

    def sync(self) -> bool:
        """Rewrite and reload if the enrolments changed or one expired; True if it did."""
        revision = self.store.enrolment_revision()
        now = self.clock()
        expired = any(e.expires_at is not None and e.expires_at <= now for e in self._expiring)
        if revision == self._revision and not expired:
            return False
        cars = active_cars(self.store.enrolments(), now)
        self._revision = revision
        self._expiring = [e for e in cars if e.expires_at is not None]
        text = render_authorization(self.cloud, cars)
        if self.path.exists() and self.path.read_text() == text:
            return False  # another replica (or the fleet at start) wrote it already
        write_atomically(self.path, text)
        self.reload()
        log.info("NATS authorization: %d cars may connect (reloaded)", len(cars))
        return True

    def reload(self) -> None:
        """Tell every nats-server to re-read its config (SIGHUP is nats-server's reload)."""
        for pid_file in self.pid_files:
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGHUP)
                self.reloads += 1
            except (OSError, ValueError) as exc:
                log.warning("could not signal nats-server (pid file %s): %s", pid_file, exc)

"""``idlefleet keys``, ``cars`` and ``models``: the operator's commands for who may do what.

``keys`` works on the store directly (``--store``), as a database administrator would: it is
how the first operator key comes to exist, and it needs no running coordinator. A new key's
secret is printed once and never stored (only its sha256 is); a revoked key stops working on
every replica within the key cache's period (2 s). ``cars`` enrols and revokes cars through a
coordinator's operator API (``--api-key`` of an operator, or ``IDLEFLEET_API_KEY``), so the
coordinator rewrites nats-server's accounts at once: a revoked car is disconnected within a
second. ``models`` makes the offline model-signing key and releases a model over the air: it
signs a manifest of the model's files and publishes them to the fleet's models object store
(as the model publisher, the one user of the MODELS account); cars started with the public key
run only such releases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from idlefleet.cli.argtypes import whole
from idlefleet.cli.owner import (
    API_KEY_ENV,
    DEFAULT_COORDINATOR,
    OwnerCommandError,
    _Coordinator,
    add_ca_file_argument,
)

__all__ = ["add_admin_parsers", "run_cars", "run_keys", "run_models"]


def add_admin_parsers(sub: Any) -> None:
    keys = sub.add_parser("keys", help="operator: create, list and revoke API keys (in the store)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key and print its secret (once)")
    create.add_argument("--role", required=True, choices=("customer", "owner", "operator"))
    create.add_argument(
        "--principal",
        required=True,
        help="whom it acts for: a customer account, an owner (whose cars it controls), ...",
    )
    create.add_argument("--name", default="", help="a label (default: the principal)")
    create.add_argument("--requests-per-minute", type=whole(1), default=None)
    create.add_argument("--tokens-per-minute", type=whole(1), default=None)
    create.add_argument("--queued-requests", type=whole(1), default=None)
    keys_sub.add_parser("list", help="every key, without secrets")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")
    for parser in keys_sub.choices.values():
        parser.add_argument(
            "--store",
            default="sqlite:///.idlefleet/coordinator.db",
            help="the coordinators' store URL (default: the embedded fleet's)",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")

    cars = sub.add_parser("cars", help="operator: enrol, list and revoke cars (NATS identities)")
    cars_sub = cars.add_subparsers(dest="cars_command", required=True)
    enrol = cars_sub.add_parser("enrol", help="let a car connect with its public nkey")
    enrol.add_argument("--vehicle", required=True)
    enrol.add_argument("--nkey", required=True, help="the car's public nkey (U...)")
    enrol.add_argument("--owner", required=True, help="the owner principal it belongs to")
    enrol.add_argument(
        "--valid-days", type=whole(1), default=None, help="credentials expire after this"
    )
    cars_sub.add_parser("list", help="every enrolment")
    models = sub.add_parser("models", help="operator: signing key and over-the-air releases")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    keygen = models_sub.add_parser("keygen", help="make the offline model-signing key pair")
    keygen.add_argument("--signing-key", type=Path, required=True, help="private key (PEM)")
    release = models_sub.add_parser("release", help="sign and publish a model's files")
    release.add_argument("--signing-key", type=Path, required=True)
    release.add_argument("--model", required=True)
    release.add_argument("--nats-url", required=True)
    release.add_argument(
        "--nats-seed", type=Path, required=True, help="the model publisher's seed (MODELS)"
    )
    release.add_argument("--nats-ca", type=Path, default=None)
    release.add_argument("--valid-days", type=whole(1), default=90)
    cut = cars_sub.add_parser("revoke", help="cut a car off now")
    cut.add_argument("--vehicle", required=True)
    for parser in cars_sub.choices.values():
        parser.add_argument("--coordinator", default=DEFAULT_COORDINATOR)
        parser.add_argument(
            "--api-key", default=None, help=f"an operator's key (default: ${API_KEY_ENV})"
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
        add_ca_file_argument(parser)


def run_keys(args: argparse.Namespace) -> int:
    from idlefleet.coordinator.access import DEFAULT_QUOTAS, Role, new_api_key
    from idlefleet.coordinator.store import open_store

    store = open_store(args.store)
    try:
        if args.keys_command == "create":
            given = {
                "requests_per_minute": args.requests_per_minute,
                "tokens_per_minute": args.tokens_per_minute,
                "queued_requests": args.queued_requests,
            }
            # What is not given keeps the role's default (not "unlimited").
            quotas = dataclasses.replace(
                DEFAULT_QUOTAS[Role(args.role)],
                **{name: value for name, value in given.items() if value is not None},
            )
            try:
                secret, record = new_api_key(Role(args.role), args.principal, args.name, quotas)
            except ValueError as exc:
                print(f"idlefleet keys create: {exc}", file=sys.stderr)
                return 2
            store.put_api_key(record)
            shown = {"id": record.id, "secret": secret, **_key_json(record)}
            print(json.dumps(shown, indent=2) if args.json else f"{record.id}  {secret}")
            return 0
        if args.keys_command == "list":
            found = [_key_json(record) for record in store.list_api_keys()]
            if args.json:
                print(json.dumps(found, indent=2))
            for key in [] if args.json else found:
                state = "revoked" if key["revoked_at"] else "active"
                print(f"{key['id']}  {key['role']:<8}  {key['principal']:<24}  {state}")
            return 0
        if not store.revoke_api_key(args.key_id, time.time()):
            print(f"idlefleet keys revoke: no active key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
        return 0
    finally:
        store.close()


def _key_json(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "role": record.role,
        "principal": record.principal,
        "name": record.name,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "requests_per_minute": record.requests_per_minute,
        "tokens_per_minute": record.tokens_per_minute,
        "queued_requests": record.queued_requests,
    }


def run_cars(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        print(f"idlefleet cars: no API key: pass --api-key or set {API_KEY_ENV}", file=sys.stderr)
        return 2
    coordinator = _Coordinator(args.coordinator.rstrip("/"), key, args.ca_file)
    try:
        if args.cars_command == "enrol":
            body: dict[str, Any] = {
                "vehicle_id": args.vehicle,
                "nkey": args.nkey,
                "owner": args.owner,
            }
            if args.valid_days is not None:
                body["expires_at"] = time.time() + args.valid_days * 86_400
            found = coordinator.call("POST", "/fleet/enrolments", body)
        elif args.cars_command == "revoke":
            vehicle = urllib.parse.quote(args.vehicle, safe="")
            found = coordinator.call("DELETE", f"/fleet/enrolments/{vehicle}")
        else:
            found = coordinator.call("GET", "/fleet/enrolments")
    except OwnerCommandError as exc:
        print(f"idlefleet cars {args.cars_command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2))
    elif args.cars_command == "list":
        for e in found["data"]:
            print(f"{e['vehicle_id']:<24}  {e['owner']:<24}  {e['status']:<8}  {e['nkey']}")
    else:
        print(f"{found['vehicle_id']}: {found['status']} (owner {found['owner']})")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from idlefleet.models.manifest import generate_signing_key, load_private_key, public_key_pem

    if args.models_command == "keygen":
        try:
            key = generate_signing_key(args.signing_key)
        except (FileExistsError, OSError) as exc:
            print(f"idlefleet models keygen: {exc}", file=sys.stderr)
            return 1
        public = args.signing_key.with_suffix(".pub.pem")
        public.write_bytes(public_key_pem(key))
        print(f"private key {args.signing_key} (keep it offline); public key {public}")
        return 0
    import asyncio

    from idlefleet.workloads import for_model

    workload = for_model(args.model)
    if workload is None:
        print(f"idlefleet models release: no workload serves {args.model}", file=sys.stderr)
        return 2
    key = load_private_key(args.signing_key)
    release = asyncio.run(
        _release(args, workload.model_files(args.model), key, args.valid_days * 86_400.0)
    )
    sent = (
        "already current"
        if release.published is None
        else (f"{release.published.bytes_uploaded} bytes uploaded")
    )
    print(f"{args.model} version {release.manifest.version}: {release.digest} ({sent})")
    return 0


async def _release(args: argparse.Namespace, files: Any, key: Any, ttl_s: float) -> Any:
    import nats

    from idlefleet.embedded.tls import client_context
    from idlefleet.models.release import release_model

    options: dict[str, Any] = {"nkeys_seed_str": args.nats_seed.read_text().strip()}
    if args.nats_ca is not None:
        options["tls"] = client_context(args.nats_ca)
    nc = await nats.connect(args.nats_url, **options)
    try:
        return await release_model(nc.jetstream(), args.model, files, key, ttl_s)
    finally:
        await nc.close()

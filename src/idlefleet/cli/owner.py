"""``idlefleet owner``: a car owner's view and control of their car's policy and consent.

A thin client of the coordinator's owner API (``/fleet/vehicles/{id}/policy`` and
``/consent``) over plain ``urllib``: show the policy, opt in or out (optionally narrowing the
purposes and data regions), replace the whole policy from a JSON file, and list the consent
record. Every request carries the owner's API key (``--api-key``, or ``IDLEFLEET_API_KEY``,
which keeps it out of the shell history and the process list) as a Bearer token (over HTTPS
signed by a private CA, such as ``idlefleet up --tls``'s, given ``--ca-file`` or
``IDLEFLEET_CA_FILE``), and the
coordinator records the change as made by that key (``owner:<name>``). The coordinator
validates every change; this command only checks what argparse can (ids, names, files), so a
bad argument or a missing key exits 2 before any request, a refused change prints the
coordinator's reason and exits 1, and so does a coordinator that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from idlefleet.coordinator.statements import money, to_csv
from idlefleet.protocol.policy import DATA_REGIONS, PURPOSES
from idlefleet.protocol.subjects import is_valid_vehicle_id

__all__ = [
    "API_KEY_ENV",
    "CA_FILE_ENV",
    "DEFAULT_COORDINATOR",
    "add_owner_parser",
    "ca_file",
    "run_owner",
]

DEFAULT_COORDINATOR = "http://127.0.0.1:8000"
"""Where ``idlefleet up`` serves HTTP by default (``cli/up.py``: 127.0.0.1, port 8000)."""
API_KEY_ENV = "IDLEFLEET_API_KEY"
"""The environment variable ``--api-key`` defaults to."""
CA_FILE_ENV = "IDLEFLEET_CA_FILE"
"""The environment variable ``--ca-file`` defaults to."""
TIMEOUT_S = 10.0


class OwnerCommandError(Exception):
    """The command ran but failed (refused or unreachable): exit status 1."""


# -- argument types (a bad value exits 2 with argparse's message) --------------------------------


def _vehicle(text: str) -> str:
    if not is_valid_vehicle_id(text):
        raise argparse.ArgumentTypeError(
            f"vehicle id {text!r} must be 1-64 characters of letters, digits, '_' or '-'"
        )
    return text


def _choices(allowed: tuple[str, ...], what: str) -> Any:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(allowed)}"
            )
        return names

    return parse


def _url(text: str) -> str:
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(
            f"coordinator URL {text!r} must look like {DEFAULT_COORDINATOR}"
        )
    return text.rstrip("/")


def ca_file(text: str) -> Path:
    """A PEM file of CA certificates to trust for the coordinator's HTTPS (argparse type)."""
    try:
        ssl.create_default_context(cafile=text)
    except ssl.SSLError as exc:  # an OSError too: first
        raise argparse.ArgumentTypeError(
            f"CA file {text} holds no PEM certificate ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read CA file {text}: {exc.strerror}") from None
    return Path(text)


def add_ca_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-file",
        type=ca_file,
        default=os.environ.get(CA_FILE_ENV) or None,  # a string default goes through `type`
        help="PEM CA certificate to trust for an https:// coordinator whose certificate a "
        f"private CA signed (as `idlefleet up --tls` prints; default: ${CA_FILE_ENV})",
    )


def _policy_file(text: str) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(text).read_text(encoding="utf-8"))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8, not JSON, or a number of over 4,300 digits
        raise argparse.ArgumentTypeError(f"{text} is not JSON: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{text} is not JSON: nested too deeply") from None
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError(f"{text} must hold a JSON object (the policy)")
    # Accept the output of ``owner show --json`` too, so show → edit → set-policy round-trips.
    if isinstance(loaded.get("policy"), dict) and "version" in loaded:
        return dict(loaded["policy"])
    return loaded


# -- parser ------------------------------------------------------------------------------------


def add_owner_parser(sub: Any) -> None:
    """Register ``owner`` and its commands on the ``idlefleet`` subparsers ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--coordinator",
        type=_url,
        default=DEFAULT_COORDINATOR,
        help=f"coordinator HTTP URL (default {DEFAULT_COORDINATOR}, as `idlefleet up`)",
    )
    common.add_argument("--vehicle", type=_vehicle, required=True, help="vehicle id")
    common.add_argument(
        "--api-key",
        help=f"the owner's API key (default: ${API_KEY_ENV}, which keeps it out of `ps`)",
    )
    common.add_argument("--json", action="store_true", help="print the coordinator's JSON")
    add_ca_file_argument(common)

    owner = sub.add_parser("owner", help="show and change a car owner's policy and consent")
    commands = owner.add_subparsers(dest="owner_command", required=True)
    commands.add_parser("show", parents=[common], help="show the car's current policy")
    opt_in = commands.add_parser(
        "opt-in", parents=[common], help="let the car compute (keeps the rest of the policy)"
    )
    opt_in.add_argument(
        "--purposes",
        type=_choices(PURPOSES, "purpose"),
        help=f"comma-separated purposes to allow (of {', '.join(PURPOSES)}); default: unchanged",
    )
    opt_in.add_argument(
        "--regions",
        type=_choices(DATA_REGIONS, "data region"),
        help=f"comma-separated data regions to allow (of {', '.join(DATA_REGIONS)}); "
        "default: unchanged",
    )
    commands.add_parser("opt-out", parents=[common], help="stop the car computing")
    set_policy = commands.add_parser(
        "set-policy", parents=[common], help="replace the whole policy with a JSON file"
    )
    set_policy.add_argument(
        "--file",
        type=_policy_file,
        required=True,
        dest="policy",
        help="JSON policy (or the output of `owner show --json`)",
    )
    commands.add_parser("history", parents=[common], help="list the consent record, oldest first")
    earnings = commands.add_parser(
        "earnings",
        parents=[common],
        help="the car's statement per day: compute hours, kWh, earned, electricity, net",
    )
    earnings.add_argument("--csv", action="store_true", help="print it as CSV")


# -- running -----------------------------------------------------------------------------------


def run_owner(args: argparse.Namespace) -> int:
    """Run one ``owner`` command; 0 on success, 1 if refused or unreachable, 2 without a key."""
    api_key = (args.api_key or os.environ.get(API_KEY_ENV) or "").strip()
    if not api_key:
        print(
            f"idlefleet owner {args.owner_command}: no API key: pass --api-key or set "
            f"{API_KEY_ENV} (ask the fleet operator for an owner key)",
            file=sys.stderr,
        )
        return 2
    coordinator = _Coordinator(args.coordinator, api_key, args.ca_file)
    base = f"/fleet/vehicles/{args.vehicle}"
    try:
        if args.owner_command == "show":
            body = coordinator.call("GET", f"{base}/policy")
            lines = _policy_lines(body)
        elif args.owner_command == "history":
            body = coordinator.call("GET", f"{base}/consent")
            lines = _history_lines(args.vehicle, body)
        elif args.owner_command == "earnings":
            body = coordinator.call("GET", f"/fleet/earnings?vehicle_id={args.vehicle}")
            lines = _earnings_lines(args.vehicle, body, args.csv)
        elif args.owner_command == "set-policy":
            body = coordinator.call("PUT", f"{base}/policy", {"policy": args.policy})
            lines = [_changed(body, "policy set"), *_policy_lines(body)]
        else:
            consent: dict[str, Any] = {"opted_in": args.owner_command == "opt-in"}
            if getattr(args, "purposes", None) is not None:
                consent["purposes"] = args.purposes
            if getattr(args, "regions", None) is not None:
                consent["data_regions"] = args.regions
            body = coordinator.call("POST", f"{base}/consent", consent)
            policy = body["policy"]
            what = (
                f"opted in (purposes: {_listed(policy['purposes'], PURPOSES)}; "
                f"data regions: {_listed(policy['data_regions'], DATA_REGIONS)})"
                if policy["opted_in"]
                else "opted out"
            )
            lines = [_changed(body, what)]
    except OwnerCommandError as exc:
        print(f"idlefleet owner {args.owner_command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else "\n".join(lines))
    return 0


class _Coordinator:
    """The coordinator's HTTP API as one API key sees it."""

    def __init__(self, base_url: str, api_key: str, ca: Path | None = None) -> None:
        self.base_url = base_url
        self._api_key = api_key
        self._context = None if ca is None else ssl.create_default_context(cafile=str(ca))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Authorization": f"Bearer {self._api_key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(
                request, timeout=TIMEOUT_S, context=self._context
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            hint = f" (is --api-key or ${API_KEY_ENV} right?)" if exc.code == 401 else ""
            raise OwnerCommandError(f"refused ({exc.code}): {_error_message(exc)}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise OwnerCommandError(
                    f"the coordinator at {self.base_url} has a certificate we do not trust "
                    f"({reason.verify_message}); pass the CA that signed it with --ca-file "
                    f"(or ${CA_FILE_ENV})"
                ) from None
            raise OwnerCommandError(
                f"cannot reach the coordinator at {self.base_url} ({reason}); is it running "
                "(`idlefleet up`), and is --coordinator right?"
            ) from None
        except json.JSONDecodeError:
            raise OwnerCommandError(f"{url} did not answer JSON; is it a coordinator?") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    raw = exc.read()
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500] or str(exc.reason)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _changed(body: dict[str, Any], what: str) -> str:
    reached = (
        "pushed to the car"
        if body.get("pushed_to_vehicle")
        else "the car was not reached; it picks the change up at its next heartbeat"
    )
    return f"{body['vehicle_id']}: {what}, policy version {body['version']}; {reached}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _listed(values: list[str], every: tuple[str, ...]) -> str:
    return "all" if sorted(values) == sorted(every) else ", ".join(values)


def _policy_lines(body: dict[str, Any]) -> list[str]:
    p = body["policy"]
    version = (
        f"{body['version']} (set {_when(body['updated_at'])} by {body['actor']})"
        if body["version"]
        else "0 (never set: the cautious defaults)"
    )
    cap = p["daily_energy_cap_kwh"]
    departure = (
        f"{p['departure_time']} (stop {p['stop_before_departure_min']} min before)"
        if p["departure_time"]
        else "not set"
    )
    rows = [
        ("vehicle", body["vehicle_id"]),
        ("policy version", version),
        ("opted in", _yes(p["opted_in"])),
        ("charging only", _yes(p["charging_only"])),
        ("charge floor", f"{p['soc_floor_percent']:g} %"),
        ("max battery temp", f"{p['max_battery_temp_c']:g} °C"),
        ("max chip temp", f"{p['max_chip_temp_c']:g} °C"),
        ("allowed hours", ", ".join(p["allowed_hours"]) or "any time"),
        ("time zone", p["timezone"]),
        ("daily energy cap", "none" if cap is None else f"{cap:g} kWh"),
        ("departure", departure),
        ("purposes", _listed(p["purposes"], PURPOSES)),
        ("data regions", _listed(p["data_regions"], DATA_REGIONS)),
    ]
    return [f"{label:<17} {value}" for label, value in rows]


def _earnings_lines(vehicle_id: str, body: dict[str, Any], as_csv: bool) -> list[str]:
    rows, currency = body["data"], body["currency"]
    if as_csv:
        return to_csv(rows).splitlines()
    if not rows:
        return [f"{vehicle_id}: nothing earned yet"]
    head = (
        f"{'day':<10}  {'requests':>8}  {'hours':>7}  {'kWh':>8}  {'earned':>11}  "
        f"{'in escrow':>11}  {'electricity':>11}  {'net':>11}"
    )
    lines = [f"{vehicle_id}: earnings in {currency}", head]
    for r in rows:
        lines.append(
            f"{r['day']:<10}  {r['requests']:>8}  {r['compute_hours']:>7.3f}  {r['kwh']:>8.4f}  "
            f"{money(r['earned']):>11}  {money(r['escrow']):>11}  "
            f"{money(r['electricity']):>11}  {money(r['net']):>11}"
        )
    total = {k: sum(r[k] for r in rows) for k in ("earned", "escrow", "electricity", "net")}
    lines.append(
        f"{'total':<10}  {sum(r['requests'] for r in rows):>8}  {'':>7}  {'':>8}  "
        f"{money(total['earned']):>11}  {money(total['escrow']):>11}  "
        f"{money(total['electricity']):>11}  {money(total['net']):>11}"
    )
    if any(r["reversed"] for r in rows):
        reversed_ = sum(r["reversed"] for r in rows)
        lines.append(f"not paid (the car's results failed verification): {money(reversed_)}")
    return lines


def _history_lines(vehicle_id: str, body: dict[str, Any]) -> list[str]:
    entries = body["data"]
    if not entries:
        return [f"{vehicle_id}: no policy was ever set (the car stays opted out)"]
    lines = [f"{'version':>7}  {'when':<23}  {'actor':<20}  {'consent':<10}  purposes / regions"]
    for e in entries:
        consent = "opted in" if e["opted_in"] else "opted out"
        scope = f"{_listed(e['purposes'], PURPOSES)} / {_listed(e['data_regions'], DATA_REGIONS)}"
        lines.append(
            f"{e['version']:>7}  {_when(e['created_at']):<23}  {e['actor']:<20}  "
            f"{consent:<10}  {scope}"
        )
    return lines

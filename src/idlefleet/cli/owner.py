"""``idlefleet owner``: a car owner's view and control of their car's policy and consent.

A thin client of the coordinator's owner API (``/fleet/vehicles/{id}/policy`` and
``/consent``) over plain ``urllib``: show the policy, opt in or out (optionally narrowing the
purposes and data regions), replace the whole policy from a JSON file, and list the consent
record. The coordinator validates every change; this command only checks what argparse can
(ids, names, files), so a bad argument exits 2 before any request, a refused change prints
the coordinator's reason and exits 1, and so does a coordinator that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from idlefleet.protocol.policy import DATA_REGIONS, PURPOSES
from idlefleet.protocol.subjects import is_valid_vehicle_id

__all__ = ["DEFAULT_COORDINATOR", "add_owner_parser", "run_owner"]

DEFAULT_COORDINATOR = "http://127.0.0.1:8000"
"""Where ``idlefleet up`` serves HTTP by default (``cli/up.py``: 127.0.0.1, port 8000)."""
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


def _actor(text: str) -> str:
    if not 1 <= len(text) <= 128 or not text.strip():
        raise argparse.ArgumentTypeError("actor must be 1-128 characters, e.g. owner:alice")
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


def _policy_file(text: str) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(text).read_text(encoding="utf-8"))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{text} is not JSON: {exc}") from None
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
    common.add_argument("--json", action="store_true", help="print the coordinator's JSON")

    owner = sub.add_parser("owner", help="show and change a car owner's policy and consent")
    commands = owner.add_subparsers(dest="owner_command", required=True)
    commands.add_parser("show", parents=[common], help="show the car's current policy")
    opt_in = commands.add_parser(
        "opt-in", parents=[common], help="let the car compute (keeps the rest of the policy)"
    )
    opt_in.add_argument("--actor", type=_actor, required=True, help="who consents, e.g. owner:a")
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
    opt_out = commands.add_parser("opt-out", parents=[common], help="stop the car computing")
    opt_out.add_argument("--actor", type=_actor, required=True, help="who withdraws consent")
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
    set_policy.add_argument("--actor", type=_actor, required=True, help="who sets the policy")
    commands.add_parser("history", parents=[common], help="list the consent record, oldest first")


# -- running -----------------------------------------------------------------------------------


def run_owner(args: argparse.Namespace) -> int:
    """Run one ``owner`` command; 0 on success, 1 if refused or unreachable."""
    base = f"{args.coordinator}/fleet/vehicles/{args.vehicle}"
    try:
        if args.owner_command == "show":
            body = _call(args.coordinator, "GET", f"{base}/policy")
            lines = _policy_lines(body)
        elif args.owner_command == "history":
            body = _call(args.coordinator, "GET", f"{base}/consent")
            lines = _history_lines(args.vehicle, body)
        elif args.owner_command == "set-policy":
            body = _call(
                args.coordinator,
                "PUT",
                f"{base}/policy",
                {"policy": args.policy, "actor": args.actor},
            )
            lines = [_changed(body, "policy set"), *_policy_lines(body)]
        else:
            consent: dict[str, Any] = {"opted_in": args.owner_command == "opt-in"}
            consent["actor"] = args.actor
            if getattr(args, "purposes", None) is not None:
                consent["purposes"] = args.purposes
            if getattr(args, "regions", None) is not None:
                consent["data_regions"] = args.regions
            body = _call(args.coordinator, "POST", f"{base}/consent", consent)
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


def _call(coordinator: str, method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise OwnerCommandError(f"refused ({exc.code}): {_error_message(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OwnerCommandError(
            f"cannot reach the coordinator at {coordinator} ({reason}); is it running "
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

"""Statements from ledger entries (pure): an owner's earnings per day and car, a customer's
usage per day and model, and either as CSV.

A charge counts on the day (UTC) it was posted. Its owner's share is ``earned`` unless it was
reversed (then it is ``reversed``, and the customer's charge is refunded); of what was earned,
``payable`` was released (the car's results verified) and ``escrow`` waits for verification.
Compute hours are the car's metered energy at its rated power (the agent meters rated power
× run time when the car reports no power of its own: then they are exact).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from idlefleet.coordinator.ledger import JOULES_PER_KWH, MICROS, Entry

__all__ = ["earnings", "to_csv", "usage"]


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).date().isoformat()


def _settlements(entries: Iterable[Entry]) -> dict[str, str]:
    """Each settled charge's id → how (``release`` or ``reversal``)."""
    return {e.settles: e.kind for e in entries if e.settles is not None}


def money(micros: int) -> str:
    """Micro-units as a decimal string with six places (exact)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def earnings(
    entries: Sequence[Entry], power_w: Mapping[str, float], currency: str = "USD"
) -> list[dict[str, Any]]:
    """An owner's statement: a row per day and car, oldest first. ``entries``: the owner's
    (every kind); ``power_w``: each car's rated power."""
    settled = _settlements(entries)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for e in entries:
        if e.kind != "charge":
            continue
        row = rows.setdefault(
            (_day(e.at), e.vehicle_id),
            {
                "day": _day(e.at),
                "vehicle_id": e.vehicle_id,
                "requests": 0,
                "compute_hours": 0.0,
                "kwh": 0.0,
                "earned": 0,
                "payable": 0,
                "escrow": 0,
                "reversed": 0,
                "electricity": 0,
            },
        )
        how = settled.get(e.id)
        row["kwh"] += e.energy_j / JOULES_PER_KWH
        row["electricity"] += e.electricity
        power = power_w.get(e.vehicle_id) or 0.0
        row["compute_hours"] += e.energy_j / power / 3600 if power > 0 else 0.0
        if how == "reversal":
            row["reversed"] += e.earned
            continue
        row["requests"] += e.requests
        row["earned"] += e.earned
        row["payable" if how == "release" else "escrow"] += e.earned
    out = []
    for key in sorted(rows):
        row = rows[key]
        row["net"] = row["earned"] - row["electricity"]
        row["currency"] = currency
        row["compute_hours"] = round(row["compute_hours"], 6)
        row["kwh"] = round(row["kwh"], 6)
        out.append(row)
    return out


def usage(entries: Sequence[Entry], currency: str = "USD") -> list[dict[str, Any]]:
    """A customer's usage: a row per day, model and API key, oldest first (refunds of
    reversed charges are taken off the day of the charge; ``api_key_id`` None: work from
    before keys were recorded)."""
    settled = _settlements(entries)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in entries:
        if e.kind != "charge":
            continue
        row = rows.setdefault(
            (_day(e.at), e.model, e.api_key_id or ""),
            {
                "day": _day(e.at),
                "model": e.model,
                "api_key_id": e.api_key_id,
                "requests": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "charged": 0,
                "refunded": 0,
            },
        )
        row["requests"] += e.requests
        row["input_tokens"] += e.input_tokens
        row["output_tokens"] += e.output_tokens
        row["charged"] += e.charged
        if settled.get(e.id) == "reversal":
            row["refunded"] += e.charged
    out = []
    for key in sorted(rows):
        row = rows[key]
        row["cost"] = row["charged"] - row["refunded"]
        row["currency"] = currency
        out.append(row)
    return out


MONEY_COLUMNS = frozenset(
    {"earned", "payable", "escrow", "reversed", "electricity", "net", "charged", "refunded", "cost"}
)


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV, money columns in units of the currency (exact decimals)."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: money(v) if k in MONEY_COLUMNS else v for k, v in row.items()})
    return out.getvalue()

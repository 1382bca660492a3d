"""The ledger's pure core: prices, and the entries a finished piece of work posts.

Money is integer micro-units of one currency (``Prices.currency``): no floats, no rounding
drift. Every entry is double-entry (its postings sum to zero) and has a deterministic id, its
idempotency key: posting it twice (a retried finalisation, a replica that took over) is a
no-op in the store. Nothing is updated or deleted: a charge is settled by exactly one later
entry (the store holds one settlement per charge), a **release** (the car's results were
verified: the owner's earning leaves escrow) or a **reversal** (the car was quarantined: the
customer gets the charge back, the owner is not paid, the platform keeps no fee).

Accounts: ``customer:<principal>`` (what the customer owes is its negative balance),
``escrow:<owner>`` (earned, not yet verified), ``owner:<owner>`` (earned and verified: payable),
``platform:fees``. A charge of C splits into the owner's share E = floor(C × share) and the
platform's fee C - E. The electricity the car spent (its metered energy × its region's tariff)
is information on the entry, not a posting: the owner pays it to their utility, not to us.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FEES",
    "Entry",
    "ModelPrice",
    "Prices",
    "Work",
    "charge_entry",
    "release_entry",
    "reversal_entry",
]

MICROS = 1_000_000
"""Micro-units in one unit of the currency."""
FEES = "platform:fees"
JOULES_PER_KWH = 3.6e6
MAX_PRICE = 10**12
"""Any one price at most this many micro-units (a million units): a typo, not a price."""
_REGION = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

EntryKind = Literal["charge", "release", "reversal"]


def customer(principal: str) -> str:
    return f"customer:{principal}"


def escrow(owner: str) -> str:
    return f"escrow:{owner}"


def owner_account(owner: str) -> str:
    return f"owner:{owner}"


@dataclass(frozen=True)
class ModelPrice:
    """What one model costs the customer, in micro-units."""

    input_per_1k: int = 0
    """Per 1,000 input (prompt) tokens."""
    output_per_1k: int = 0
    """Per 1,000 output (completion) tokens."""
    per_request: int = 0


@dataclass(frozen=True)
class Prices:
    """The price list, the owners' share and the electricity tariffs (``--prices FILE``)."""

    currency: str = "USD"
    models: Mapping[str, ModelPrice] = field(
        default_factory=lambda: {
            # OpenAI's text-embedding-3-small is 20 per 1k at list price (0.02 $/1M tokens);
            # a model a twentieth its size on cars that cost nothing idle sells below it.
            "all-MiniLM-L6-v2": ModelPrice(input_per_1k=10),
            "SmolLM2-135M-Instruct": ModelPrice(input_per_1k=50, output_per_1k=100),
        }
    )
    default: ModelPrice = ModelPrice(input_per_1k=100, output_per_1k=200)
    """For a model the list does not name."""
    owner_share_bp: int = 7000
    """The owner's share of each charge, in basis points (70%)."""
    tariffs: Mapping[str, int] = field(
        default_factory=lambda: {
            "eu": 300_000,
            "uk": 280_000,
            "us": 170_000,
            "ca": 120_000,
            "apac": 200_000,
            "latam": 180_000,
            "mea": 150_000,
        }
    )
    """Electricity, micro-units per kWh, by the car's region (its owner's first data
    region other than ``global``): information on the owner's statement."""
    default_tariff: int = 250_000

    def __post_init__(self) -> None:
        if not 0 <= self.owner_share_bp <= 10_000:
            raise ValueError(f"owner_share_bp must be 0..10000, not {self.owner_share_bp}")
        for name, price in [("default", self.default), *self.models.items()]:
            for key in ("input_per_1k", "output_per_1k", "per_request"):
                value = getattr(price, key)
                if not (isinstance(value, int) and 0 <= value <= MAX_PRICE):
                    raise ValueError(f"{name}.{key} must be an integer 0..{MAX_PRICE}: {value!r}")
        for region, tariff in [("default_tariff", self.default_tariff), *self.tariffs.items()]:
            if not (isinstance(tariff, int) and 0 <= tariff <= MAX_PRICE):
                raise ValueError(f"tariff {region} must be an integer 0..{MAX_PRICE}: {tariff!r}")

    def price(self, model: str) -> ModelPrice:
        return self.models.get(model, self.default)

    def charge(self, model: str, requests: int, input_tokens: int, output_tokens: int) -> int:
        """The customer's charge: tokens at the per-1k prices, rounded up to a micro-unit, plus
        the per-request price."""
        p = self.price(model)
        tokens = input_tokens * p.input_per_1k + output_tokens * p.output_per_1k
        return -(-tokens // 1000) + requests * p.per_request

    def earning(self, charge: int) -> int:
        """The owner's share of a charge (rounded down; the platform's fee is the rest)."""
        return charge * self.owner_share_bp // 10_000

    def electricity(self, energy_j: float, region: str | None) -> int:
        tariff = self.tariffs.get(region or "", self.default_tariff)
        return round(energy_j / JOULES_PER_KWH * tariff)

    @classmethod
    def parse(cls, data: object) -> Prices:
        """A price list from its JSON form, every field checked (``docs/ARCHITECTURE.md``)."""
        if not isinstance(data, dict):
            raise ValueError("prices must be a JSON object")
        known = {"currency", "models", "default", "owner_share_bp", "tariffs", "default_tariff"}
        if unknown := set(data) - known:
            raise ValueError(f"unknown price field(s): {', '.join(sorted(map(str, unknown)))}")
        fields: dict[str, Any] = {}
        if "currency" in data:
            currency = data["currency"]
            if not (isinstance(currency, str) and re.fullmatch(r"[A-Z]{3}", currency)):
                raise ValueError(f"currency must be a 3-letter code like USD: {currency!r}")
            fields["currency"] = currency
        if "models" in data:
            models = data["models"]
            if not isinstance(models, dict) or len(models) > 1000:
                raise ValueError("models must be an object of at most 1000 model prices")
            fields["models"] = {
                _name(name): _model_price(name, value) for name, value in models.items()
            }
        if "default" in data:
            fields["default"] = _model_price("default", data["default"])
        if "owner_share_bp" in data:
            fields["owner_share_bp"] = _int("owner_share_bp", data["owner_share_bp"])
        if "tariffs" in data:
            tariffs = data["tariffs"]
            if not isinstance(tariffs, dict) or len(tariffs) > 1000:
                raise ValueError("tariffs must be an object of at most 1000 regions")
            for region in tariffs:
                if not _REGION.match(str(region)):
                    raise ValueError(f"tariff region must be like 'eu' or 'us-west': {region!r}")
            fields["tariffs"] = {str(k): _int(f"tariffs.{k}", v) for k, v in tariffs.items()}
        if "default_tariff" in data:
            fields["default_tariff"] = _int("default_tariff", data["default_tariff"])
        return cls(**fields)

    @classmethod
    def load(cls, path: Path) -> Prices:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"price list {path}: {exc}") from None
        try:
            return cls.parse(data)
        except ValueError as exc:
            raise ValueError(f"price list {path}: {exc}") from None


def _name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable():
        raise ValueError(f"model name must be printable text of 1..128 characters: {name!r}")
    return name


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRICE:
        raise ValueError(f"{name} must be an integer 0..{MAX_PRICE} (micro-units): {value!r}")
    return value


def _model_price(name: object, value: object) -> ModelPrice:
    if not isinstance(value, dict):
        raise ValueError(f"price of {name!r} must be an object")
    keys = {"input_per_1k", "output_per_1k", "per_request"}
    if unknown := set(value) - keys:
        raise ValueError(f"price of {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    return ModelPrice(**{k: _int(f"{name}.{k}", v) for k, v in value.items()})


@dataclass(frozen=True)
class Work:
    """Work one car did for one customer, to be charged as one entry: a batch's results by
    that car (at finalisation), or one online request."""

    key: str
    """What makes it unique: ``batch:<id>:<car>`` or ``online:<request id>``."""
    principal: str
    vehicle_id: str
    owner: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    energy_j: float
    """What the car metered for it."""
    work_at: float
    """When its last result was committed: the entry leaves escrow once the car's results
    are verified through this time."""
    batch_id: str | None = None
    region: str | None = None
    api_key_id: str | None = None
    """The customer's API key the work was asked with (usage is reported per key)."""

    def __post_init__(self) -> None:
        for name in ("requests", "input_tokens", "output_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        if not (math.isfinite(self.energy_j) and self.energy_j >= 0):
            raise ValueError(f"energy_j must be finite and >= 0, not {self.energy_j}")


@dataclass(frozen=True)
class Entry:
    """One ledger entry: its postings sum to zero."""

    id: str
    kind: EntryKind
    at: float
    postings: tuple[tuple[str, int], ...]
    principal: str
    vehicle_id: str
    owner: str
    model: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    energy_j: float = 0.0
    electricity: int = 0
    """What the car's energy cost the owner (information: not a posting)."""
    work_at: float = 0.0
    batch_id: str | None = None
    settles: str | None = None
    """The charge a release or reversal settles."""
    api_key_id: str | None = None
    """The customer's API key the charge is that key's usage of (settlements: the charge's)."""

    def __post_init__(self) -> None:
        if sum(amount for _, amount in self.postings) != 0:
            raise ValueError(f"entry {self.id}: postings do not sum to zero: {self.postings}")

    def amount(self, account: str) -> int:
        return sum(a for name, a in self.postings if name == account)

    @property
    def charged(self) -> int:
        """The customer's charge a charge entry stands for."""
        return -self.amount(customer(self.principal))

    @property
    def earned(self) -> int:
        """The owner's earning a charge entry stands for."""
        return self.amount(escrow(self.owner))


def charge_entry(work: Work, prices: Prices, at: float) -> Entry:
    charge = prices.charge(work.model, work.requests, work.input_tokens, work.output_tokens)
    earned = prices.earning(charge)
    postings = [
        (customer(work.principal), -charge),
        (escrow(work.owner), earned),
        (FEES, charge - earned),
    ]
    return Entry(
        id=f"charge:{work.key}",
        kind="charge",
        at=at,
        postings=tuple(p for p in postings if p[1] != 0),
        principal=work.principal,
        vehicle_id=work.vehicle_id,
        owner=work.owner,
        model=work.model,
        requests=work.requests,
        input_tokens=work.input_tokens,
        output_tokens=work.output_tokens,
        energy_j=work.energy_j,
        electricity=prices.electricity(work.energy_j, work.region),
        work_at=work.work_at,
        batch_id=work.batch_id,
        api_key_id=work.api_key_id,
    )


def _settlement(
    charge: Entry, kind: EntryKind, at: float, postings: Iterable[tuple[str, int]]
) -> Entry:
    return replace(
        charge,
        id=f"{kind}:{charge.id}",
        kind=kind,
        at=at,
        postings=tuple(p for p in postings if p[1] != 0),
        settles=charge.id,
    )


def release_entry(charge: Entry, at: float) -> Entry:
    """The car's results were verified through the charge's work: the earning is payable."""
    earned = charge.earned
    return _settlement(
        charge,
        "release",
        at,
        [(escrow(charge.owner), -earned), (owner_account(charge.owner), earned)],
    )


def reversal_entry(charge: Entry, at: float) -> Entry:
    """The car was quarantined before its results were verified: undo the whole charge."""
    return _settlement(
        charge, "reversal", at, [(name, -amount) for name, amount in charge.postings]
    )

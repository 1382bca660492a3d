"""Who may do what over HTTP: API keys, roles, and per-key quotas.

A key is ``ifk_<role letter>_<43 url-safe characters>`` (256 random bits; the letter is ``c``,
``o`` or ``a`` for customer, owner, operator, so a leaked key's reach shows at a glance); the
store keeps only its sha256, so a leaked database holds no usable key. Each key acts for one
*principal* in one *role*:

* ``customer``: the OpenAI API (``/v1/*``), and only the principal's own files and batches;
* ``owner``: the policy and consent of the cars enrolled under the principal's name;
* ``operator``: fleet administration (enrolment, every car, leases, dispatch, security).

`KeyRing` answers "whose key is this?" from a small cache in front of the store, so a request
costs a dict lookup, not a query; a key revoked on another replica stops working within the
cache period (`KeyRing.ttl_s`, 2 s). `QuotaBuckets` are per-key token buckets for requests and
tokens per minute, kept in each replica's memory: with R replicas behind a balancer a key gets
up to R times its quota (the same trade OpenAI's per-region limits make); the queued-requests
quota is read from the store, so it holds across replicas (batches created at the same instant
on two replicas may both pass; on one replica they take turns). Every refusal is logged and
counted by reason (`AccessLog`), for the fleet API.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from idlefleet.coordinator.errors import Forbidden, RateLimited, Unauthorized
from idlefleet.coordinator.store import ApiKeyRecord, Store

__all__ = [
    "AccessLog",
    "Caller",
    "KeyRing",
    "QuotaBuckets",
    "Quotas",
    "Role",
    "hash_secret",
    "new_api_key",
]

log = logging.getLogger(__name__)


class Role(StrEnum):
    CUSTOMER = "customer"
    OWNER = "owner"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Quotas:
    """Limits of one key; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    queued_requests: int | None = None
    """Requests of the key's principal's unfinished batches (queued or running)."""

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "queued_requests"):
            value = getattr(self, name)
            whole = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not (whole and value >= 1):
                raise ValueError(f"{name} must be a whole number >= 1 or unset, got {value!r}")


DEFAULT_QUOTAS: Mapping[Role, Quotas] = {
    # A customer's default is generous for one person's scripts, far below what one key could
    # use to crowd out everybody else on a small fleet; operators set others per key.
    Role.CUSTOMER: Quotas(
        requests_per_minute=3_000, tokens_per_minute=2_000_000, queued_requests=1_000_000
    ),
    Role.OWNER: Quotas(requests_per_minute=600),
    Role.OPERATOR: Quotas(),
}

_PREFIX = "ifk_"
_ROLE_LETTER: Mapping[Role, str] = {Role.CUSTOMER: "c", Role.OWNER: "o", Role.OPERATOR: "a"}
"""Distinct per role: the first letters of owner and operator are the same."""
KEY_SHAPE = re.compile(r"ifk_[coa]_[A-Za-z0-9_-]{43}")
"""What every key looks like: anything else is refused without a store lookup."""
MAX_PRINCIPAL_CHARS = 100
"""So that ``role:principal`` fits the consent record's 128-character actor."""


@dataclass(frozen=True)
class Caller:
    """The authenticated side of a request."""

    key_id: str
    role: Role
    principal: str
    quotas: Quotas

    @property
    def actor(self) -> str:
        """How this caller is named in records (the consent record's ``actor``)."""
        return f"{self.role.value}:{self.principal}"

    def require(self, *roles: Role) -> Caller:
        if self.role not in roles:
            allowed = " or ".join(r.value for r in roles)
            raise Forbidden(
                f"This API key has the role '{self.role.value}'; this operation needs {allowed}.",
                code="insufficient_permissions",
            )
        return self


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key(
    role: Role, principal: str, name: str = "", quotas: Quotas | None = None, now: float = 0.0
) -> tuple[str, ApiKeyRecord]:
    """A fresh key: its secret (shown once) and the record to store."""
    if not 1 <= len(principal) <= MAX_PRINCIPAL_CHARS or not principal.isprintable():
        raise ValueError(f"a key's principal must be 1-{MAX_PRINCIPAL_CHARS} printable characters")
    secret = f"{_PREFIX}{_ROLE_LETTER[role]}_{secrets.token_urlsafe(32)}"
    limits = quotas if quotas is not None else DEFAULT_QUOTAS[role]
    record = ApiKeyRecord(
        id=f"key_{secrets.token_hex(8)}",
        secret_sha256=hash_secret(secret),
        role=role.value,
        principal=principal,
        name=name or principal,
        created_at=now or time.time(),
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        queued_requests=limits.queued_requests,
    )
    return secret, record


class AccessLog:
    """Refusals by reason (``missing_key``, ``revoked_key``, ``not_yours``...), logged once
    each; thread-safe, as the API's store calls run on worker threads."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def refused(self, reason: str, detail: str) -> None:
        with self._lock:
            self._counts[reason] += 1
        log.warning("refused (%s): %s", reason, detail)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class KeyRing:
    """Looks API keys up by the hash of their secret, with a short cache."""

    def __init__(
        self,
        store: Store,
        access_log: AccessLog,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.log = access_log
        self.ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization`` header; `Unauthorized` if there is none."""
        if not authorization:
            self.log.refused("missing_key", "no Authorization header")
            raise Unauthorized(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            self.log.refused("malformed_key", "Authorization header is not 'Bearer <key>'")
            raise Unauthorized(
                "The Authorization header must be 'Bearer <your API key>'.",
                code="invalid_api_key",
            )
        shown = _redacted(secret)
        # A made-up key costs no store read (a flood of them would otherwise be one each).
        record = self._lookup(hash_secret(secret)) if KEY_SHAPE.fullmatch(secret) else None
        if record is None:
            self.log.refused("wrong_key", f"unknown key {shown}")
            raise Unauthorized(f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        if record.revoked_at is not None:
            self.log.refused("revoked_key", f"revoked key {record.id}")
            raise Unauthorized(f"The API key {shown} has been revoked.", code="invalid_api_key")
        return Caller(
            key_id=record.id,
            role=Role(record.role),
            principal=record.principal,
            quotas=Quotas(
                record.requests_per_minute, record.tokens_per_minute, record.queued_requests
            ),
        )

    def forget(self) -> None:
        """Drop the cache (this replica revoked a key: it takes effect at once here)."""
        with self._lock:
            self._cache.clear()

    def _lookup(self, digest: str) -> ApiKeyRecord | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        record = self.store.api_key_by_hash(digest)
        with self._lock:
            if len(self._cache) > 100_000:  # a flood of made-up keys must not grow it for ever
                self._cache.clear()
            self._cache[digest] = (now, record)
        return record


def _redacted(secret: str) -> str:
    """A key as OpenAI shows it in errors: its start and end only."""
    if len(secret) <= 10:
        return "*" * len(secret)
    return f"{secret[:6]}{'*' * 8}{secret[-4:]}"


class QuotaBuckets:
    """Per-key token buckets for requests and tokens per minute; pure apart from the lock."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, caller: Caller, tokens: int, now: float, requests: int = 1) -> dict[str, str]:
        """Take ``requests`` and ``tokens`` from ``caller``'s buckets and return the
        ``x-ratelimit-*`` headers; `RateLimited` (nothing taken) if either would go below 0.
        An online request takes its request when it arrives and its tokens once planned."""
        limits = (
            ("requests", caller.quotas.requests_per_minute, requests),
            ("tokens", caller.quotas.tokens_per_minute, tokens),
        )
        headers: dict[str, str] = {}
        with self._lock:
            states = {}
            for kind, limit, cost in limits:
                if limit is None:
                    continue
                level = self._level(caller.key_id, kind, limit, now)
                states[kind] = (limit, level, cost)
                if cost > level:
                    wait_s = (cost - level) * 60.0 / limit if cost <= limit else math.inf
                    headers = _headers(kind, limit, level, wait_s)
                    what = "requests" if kind == "requests" else "tokens"
                    message = (
                        f"Rate limit reached for {what} per minute (RPM/TPM) on this key: "
                        f"limit {limit}, remaining {int(level)}, requested {cost}."
                    )
                    if cost > limit:
                        message += " This request is larger than the key's whole limit."
                    else:
                        message += f" Please try again in {_duration(wait_s)}."
                        headers["retry-after"] = str(max(1, math.ceil(wait_s)))
                    raise RateLimited(message, code="rate_limit_exceeded", headers=headers)
            for kind, (limit, level, cost) in states.items():
                self._buckets[(caller.key_id, kind)] = (level - cost, now)
                left = level - cost
                headers |= _headers(kind, limit, left, (limit - left) * 60.0 / limit)
        return headers

    def _level(self, key_id: str, kind: str, limit: int, now: float) -> float:
        level, at = self._buckets.get((key_id, kind), (float(limit), now))
        return min(float(limit), level + (now - at) * limit / 60.0)


def _headers(kind: str, limit: int, remaining: float, reset_s: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, int(remaining))),
        f"x-ratelimit-reset-{kind}": _duration(reset_s),
    }


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``20ms``."""
    if not math.isfinite(seconds):
        return "never"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes >= 1:
        return f"{int(minutes)}m{rest:.0f}s"
    return f"{seconds:.3g}s"

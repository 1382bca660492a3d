"""``coordinator/access.py`` bare: keys, the key ring's cache, quota buckets and the refusal log,
with a fake clock and a real (SQLite) store; no network."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

from idlefleet.coordinator.access import (
    AccessLog,
    Caller,
    KeyRing,
    QuotaBuckets,
    Quotas,
    Role,
    hash_secret,
    new_api_key,
)
from idlefleet.coordinator.errors import Forbidden, RateLimited, Unauthorized
from idlefleet.coordinator.store import ApiKeyRecord, Store, open_store, sqlite_url

NOW = 1_700_000_000.0


@pytest.fixture
def store() -> Iterator[Store]:
    s = open_store("sqlite:///:memory:")
    try:
        yield s
    finally:
        s.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ring(store: Store, clock: FakeClock) -> KeyRing:
    return KeyRing(store, AccessLog(), ttl_s=2.0, clock=clock)


def stored_key(
    store: Store, role: Role = Role.CUSTOMER, principal: str = "acme"
) -> tuple[str, str]:
    """A key put in ``store``: (secret, key id)."""
    secret, record = new_api_key(role, principal, now=NOW)
    store.put_api_key(record)
    return secret, record.id


# -- new keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "letter"), [(Role.CUSTOMER, "c"), (Role.OWNER, "o"), (Role.OPERATOR, "a")]
)
def test_a_new_key_is_prefixed_with_its_roles_letter_and_256_random_bits(
    role: Role, letter: str
) -> None:
    secret, record = new_api_key(role, "someone", now=NOW)

    assert re.fullmatch(rf"ifk_{letter}_[A-Za-z0-9_-]{{43}}", secret)
    assert re.fullmatch(r"key_[0-9a-f]{16}", record.id)
    assert (record.role, record.principal, record.name) == (role.value, "someone", "someone")
    assert (record.created_at, record.revoked_at) == (NOW, None)


def test_the_role_letters_tell_every_role_apart() -> None:
    prefixes = {new_api_key(role, "x")[0][:6] for role in Role}

    assert len(prefixes) == len(Role)


def test_keys_are_never_the_same_twice() -> None:
    made = [new_api_key(Role.CUSTOMER, "acme") for _ in range(50)]

    assert len({secret for secret, _ in made}) == 50
    assert len({record.id for _, record in made}) == 50


def test_the_record_holds_the_secrets_sha256_and_never_the_secret() -> None:
    secret, record = new_api_key(Role.OWNER, "alice", name="alice's phone")

    assert record.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert record.secret_sha256 == hash_secret(secret)
    assert not any(secret in str(value) for value in astuple(record))
    assert not any(secret[4:] in str(value) for value in astuple(record))


def test_the_stored_database_holds_no_secret(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "store.db")
    s = open_store(url)
    secrets = []
    for role in Role:
        secret, record = new_api_key(role, f"{role.value}-principal")
        s.put_api_key(record)
        secrets.append((secret, record.secret_sha256))
    s.close()

    raw = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    for secret, digest in secrets:
        assert secret.encode() not in raw
        assert secret[7:].encode() not in raw  # not even without its prefix
        assert digest.encode() in raw


def test_a_key_gets_its_roles_default_quotas_unless_given_others() -> None:
    _, customer = new_api_key(Role.CUSTOMER, "acme")
    _, operator = new_api_key(Role.OPERATOR, "ops")
    _, tiny = new_api_key(Role.CUSTOMER, "tiny", quotas=Quotas(tokens_per_minute=5))

    assert customer.requests_per_minute and customer.tokens_per_minute
    assert customer.queued_requests
    assert (operator.requests_per_minute, operator.tokens_per_minute) == (None, None)
    assert (tiny.requests_per_minute, tiny.tokens_per_minute, tiny.queued_requests) == (
        None,
        5,
        None,
    )


@pytest.mark.parametrize("principal", ["", "x" * 101, "tab\there", "new\nline"])
def test_a_principal_must_be_1_to_100_printable_characters(principal: str) -> None:
    with pytest.raises(ValueError, match="principal"):
        new_api_key(Role.CUSTOMER, principal)


@pytest.mark.parametrize("value", [0, -1, 1.5, "10"])
def test_a_quota_is_a_whole_number_of_at_least_1(value: Any) -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        Quotas(requests_per_minute=value)


def test_a_callers_actor_is_its_role_and_principal() -> None:
    caller = Caller("key_1", Role.OWNER, "alice", Quotas())

    assert caller.actor == "owner:alice"
    assert caller.require(Role.OWNER, Role.OPERATOR) is caller
    with pytest.raises(Forbidden) as refused:
        caller.require(Role.OPERATOR)
    assert refused.value.code == "insufficient_permissions"
    assert "the role 'owner'; this operation needs operator" in refused.value.message


# -- the key ring --------------------------------------------------------------------------------


def test_a_stored_key_authenticates_as_its_principal_in_its_role(
    store: Store, ring: KeyRing
) -> None:
    secret, record = new_api_key(Role.OWNER, "alice", quotas=Quotas(requests_per_minute=7))
    store.put_api_key(record)

    caller = ring.authenticate(f"Bearer {secret}")

    assert caller == Caller(record.id, Role.OWNER, "alice", Quotas(requests_per_minute=7))


@pytest.mark.parametrize(
    ("header", "code", "reason"),
    [
        (None, "missing_api_key", "missing_key"),
        ("", "missing_api_key", "missing_key"),
        ("Basic eDp5", "invalid_api_key", "malformed_key"),
        ("Bearer   ", "invalid_api_key", "malformed_key"),
        ("Bearer ifk_c_not-a-stored-key", "invalid_api_key", "wrong_key"),
    ],
)
def test_a_missing_malformed_or_unknown_key_is_unauthorized_and_logged(
    ring: KeyRing, header: str | None, code: str, reason: str
) -> None:
    with pytest.raises(Unauthorized) as refused:
        ring.authenticate(header)

    assert refused.value.code == code
    assert refused.value.http_status == 401
    assert ring.log.snapshot() == {reason: 1}


def test_the_ring_asks_the_store_once_per_cache_period(
    store: Store, ring: KeyRing, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, _ = stored_key(store)
    lookups: list[str] = []
    look_up = store.api_key_by_hash

    def counted(digest: str) -> ApiKeyRecord | None:
        lookups.append(digest)
        return look_up(digest)

    monkeypatch.setattr(store, "api_key_by_hash", counted)

    for at in (0.0, 0.5, 1.99):
        clock.now = at
        ring.authenticate(f"Bearer {secret}")
    clock.now = 2.0
    ring.authenticate(f"Bearer {secret}")

    assert lookups == [hash_secret(secret)] * 2


def test_a_revocation_is_seen_once_the_cache_period_is_over(
    store: Store, ring: KeyRing, clock: FakeClock
) -> None:
    secret, key_id = stored_key(store)
    ring.authenticate(f"Bearer {secret}")

    assert store.revoke_api_key(key_id, NOW)
    clock.now = 1.99
    still = ring.authenticate(f"Bearer {secret}")  # another replica's revocation: not yet seen
    clock.now = 2.0
    with pytest.raises(Unauthorized) as refused:
        ring.authenticate(f"Bearer {secret}")

    assert still.key_id == key_id
    assert refused.value.code == "invalid_api_key"
    assert "has been revoked" in refused.value.message
    assert secret not in refused.value.message
    assert ring.log.snapshot() == {"revoked_key": 1}


def test_forget_makes_a_revocation_take_effect_at_once(store: Store, ring: KeyRing) -> None:
    secret, key_id = stored_key(store)
    ring.authenticate(f"Bearer {secret}")

    store.revoke_api_key(key_id, NOW)
    ring.forget()

    with pytest.raises(Unauthorized, match="has been revoked"):
        ring.authenticate(f"Bearer {secret}")


def test_an_unknown_key_is_cached_too_until_the_period_ends(
    store: Store, ring: KeyRing, clock: FakeClock
) -> None:
    secret, record = new_api_key(Role.CUSTOMER, "acme")
    with pytest.raises(Unauthorized):
        ring.authenticate(f"Bearer {secret}")
    store.put_api_key(record)  # made on another replica just after

    with pytest.raises(Unauthorized):
        ring.authenticate(f"Bearer {secret}")
    clock.now = 2.0
    assert ring.authenticate(f"Bearer {secret}").key_id == record.id


def test_an_error_shows_only_the_ends_of_the_key(ring: KeyRing) -> None:
    made_up = "ifk_c_" + "s" * 39 + "TAIL"

    with pytest.raises(Unauthorized) as refused:
        ring.authenticate(f"Bearer {made_up}")

    assert refused.value.message == "Incorrect API key provided: ifk_c_********TAIL."


# -- quota buckets -------------------------------------------------------------------------------


def caller(key_id: str = "key_1", **quotas: int) -> Caller:
    return Caller(key_id, Role.CUSTOMER, "acme", Quotas(**quotas))


def test_the_requests_bucket_empties_then_refills_at_its_rate_per_second() -> None:
    buckets, who = QuotaBuckets(), caller(requests_per_minute=60)
    for _ in range(60):
        buckets.take(who, 0, now=0.0)

    with pytest.raises(RateLimited) as at_once:
        buckets.take(who, 0, now=0.0)
    with pytest.raises(RateLimited) as half_a_second_later:
        buckets.take(who, 0, now=0.5)
    refilled = buckets.take(who, 0, now=1.0)  # 60 a minute: one a second

    assert at_once.value.code == "rate_limit_exceeded"
    assert at_once.value.http_status == 429
    assert at_once.value.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "retry-after": "1",
    }
    assert half_a_second_later.value.headers["x-ratelimit-reset-requests"] == "500ms"
    assert half_a_second_later.value.headers["retry-after"] == "1"  # never 0
    assert "Please try again in 500ms." in half_a_second_later.value.message
    assert refilled["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited):
        buckets.take(who, 0, now=1.0)


def test_a_success_says_what_is_left_and_when_the_bucket_is_full_again() -> None:
    buckets, who = QuotaBuckets(), caller(requests_per_minute=60, tokens_per_minute=600)

    headers = buckets.take(who, 500, now=0.0)

    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "50s",
    }


def test_a_bucket_never_refills_past_its_limit() -> None:
    buckets, who = QuotaBuckets(), caller(requests_per_minute=10)
    buckets.take(who, 0, now=0.0)

    headers = buckets.take(who, 0, now=3600.0)

    assert headers["x-ratelimit-remaining-requests"] == "9"


def test_a_refusal_for_tokens_takes_nothing_from_either_bucket() -> None:
    buckets, who = QuotaBuckets(), caller(requests_per_minute=10, tokens_per_minute=600)
    buckets.take(who, 500, now=0.0)

    with pytest.raises(RateLimited) as refused:
        buckets.take(who, 200, now=0.0)
    after = buckets.take(who, 100, now=0.0)

    assert refused.value.headers == {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "10s",  # 100 more tokens at 10 a second
        "retry-after": "10",
    }
    assert "limit 600, remaining 100, requested 200" in refused.value.message
    assert after["x-ratelimit-remaining-requests"] == "8"  # the refused one took none
    assert after["x-ratelimit-remaining-tokens"] == "0"


def test_a_request_larger_than_the_whole_quota_is_refused_without_a_retry_time() -> None:
    buckets, who = QuotaBuckets(), caller(tokens_per_minute=600)

    with pytest.raises(RateLimited) as refused:
        buckets.take(who, 601, now=0.0)

    assert "larger than the key's whole limit" in refused.value.message
    assert "retry-after" not in refused.value.headers
    assert refused.value.headers["x-ratelimit-reset-tokens"] == "never"
    assert buckets.take(who, 600, now=0.0)["x-ratelimit-remaining-tokens"] == "0"


def test_each_key_has_buckets_of_its_own() -> None:
    buckets = QuotaBuckets()
    spent, fresh = caller("key_1", requests_per_minute=1), caller("key_2", requests_per_minute=1)
    buckets.take(spent, 0, now=0.0)

    with pytest.raises(RateLimited):
        buckets.take(spent, 0, now=0.0)
    assert buckets.take(fresh, 0, now=0.0)["x-ratelimit-remaining-requests"] == "0"


def test_an_unlimited_key_is_never_refused_and_gets_no_headers() -> None:
    buckets, who = QuotaBuckets(), Caller("key_op", Role.OPERATOR, "ops", Quotas())

    assert all(buckets.take(who, 10**9, now=0.0) == {} for _ in range(1000))


# -- the refusal log -----------------------------------------------------------------------------


def test_the_access_log_counts_refusals_by_reason() -> None:
    log = AccessLog()
    for reason in ("wrong_key", "not_yours", "wrong_key"):
        log.refused(reason, "detail")

    snapshot = log.snapshot()
    log.refused("wrong_key", "detail")

    assert snapshot == {"wrong_key": 2, "not_yours": 1}  # a copy, not a live view
    assert log.snapshot()["wrong_key"] == 3

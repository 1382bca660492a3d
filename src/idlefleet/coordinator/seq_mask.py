"""Request numbers a car cannot read: each lease shows its requests under numbers that are a
keyed permutation of their real ones.

Verification slips probes (a re-run of another car's request, a canary whose answer is known)
into a car's unit, numbered like the unit's own requests. With real numbers a probe would stand
out (a unit's requests are often consecutive), and a cheater could answer probes honestly and
nothing else. Under the mask every number of a unit looks random, so does a probe's.

The permutation is a 4-round Feistel network on 30 bits. Its round keys (64 bits each) are
keyed BLAKE2b of the lease id under a secret the replicas share (kept in the store): any
replica maps a car's numbers back without remembering the lease, and a car that knows its
lease id cannot. The round function is SplitMix64's finaliser of half XOR round key: not a
cryptographic PRF (keyed BLAKE2b in each round cost ~15 us a request), but to tell a probe
from a request a car would have to recover a lease's 256 bits of round keys from numbers whose
real values it does not know. Real numbers must be below 2**30 (a batch holds at most 50,000
requests). Cost: ~3 us a request.
"""

from __future__ import annotations

import hashlib

__all__ = ["SEQ_BITS", "SeqMask"]

SEQ_BITS = 30
_HALF = SEQ_BITS // 2
_HALF_MASK = (1 << _HALF) - 1
_ROUNDS = 4
_M64 = (1 << 64) - 1


class SeqMask:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the mask's secret must be at least 16 bytes")
        self._secret = secret[:64]

    def _keys(self, lease_id: str) -> list[int]:
        root = hashlib.blake2b(lease_id.encode(), key=self._secret, digest_size=32).digest()
        return [int.from_bytes(root[8 * r : 8 * r + 8], "little") for r in range(_ROUNDS)]

    @staticmethod
    def _f(key: int, half: int) -> int:
        x = half ^ key
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _M64
        x ^= x >> 31
        return x & _HALF_MASK

    def wire(self, lease_id: str, seqs: list[int]) -> list[int]:
        """The numbers the car sees for these real request numbers of the lease."""
        keys = self._keys(lease_id)
        out = []
        for seq in seqs:
            if not 0 <= seq < 1 << SEQ_BITS:
                raise ValueError(f"request number {seq} is out of the mask's range")
            left, right = seq >> _HALF, seq & _HALF_MASK
            for key in keys:
                left, right = right, left ^ self._f(key, right)
            out.append((left << _HALF) | right)
        return out

    def real(self, lease_id: str, wire: list[int]) -> list[int | None]:
        """The real numbers of what the car sent (None: not a number the mask can give)."""
        keys = self._keys(lease_id)[::-1]
        out: list[int | None] = []
        for value in wire:
            if not 0 <= value < 1 << SEQ_BITS:
                out.append(None)
                continue
            left, right = value >> _HALF, value & _HALF_MASK
            for key in keys:
                left, right = right ^ self._f(key, left), left
            out.append((left << _HALF) | right)
        return out

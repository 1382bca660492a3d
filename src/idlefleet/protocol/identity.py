"""A car's identity on the wire: an Ed25519 key pair in NATS's nkey encoding.

The car makes its key pair itself and keeps the seed (private key) in a file only it can read;
only the public key (``U...``, 56 characters) leaves the car, at enrolment. NATS checks, at
every connection, that the client signed the server's nonce with the seed of an enrolled
public key, and the server's permissions for that key confine the car to its own subjects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nkeys

__all__ = ["is_user_nkey", "load_or_create_seed", "new_nkey_seed", "public_nkey"]

_USER_NKEY = re.compile(r"^U[A-Z2-7]{55}$")


def new_nkey_seed() -> str:
    """A fresh user seed (``SU...``): 32 random bytes, nkey-encoded."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def public_nkey(seed: str) -> str:
    """The public user nkey (``U...``) of a seed; ``ValueError`` if it is not a user seed."""
    try:
        key = nkeys.from_seed(bytearray(seed.strip().encode()))
        public = bytes(key.public_key).decode()
    except Exception as exc:  # nkeys raises its own errors and binascii's for bad text
        raise ValueError(f"not an nkey seed: {exc}") from None
    if not is_user_nkey(public):
        raise ValueError("the seed is not a user nkey seed (it must start with 'SU')")
    return public


def is_user_nkey(text: str) -> bool:
    return bool(_USER_NKEY.fullmatch(text))


def load_or_create_seed(path: Path) -> str:
    """The seed in ``path``, made (mode 0600) if the file does not exist yet."""
    if path.exists():
        seed = path.read_text().strip()
        public_nkey(seed)  # refuse a damaged file now, with the path in the message
        return seed
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = new_nkey_seed()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed + "\n")
    return seed

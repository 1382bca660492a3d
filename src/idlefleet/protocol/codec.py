"""Encoding and validation of wire messages: the one place bytes become typed messages.

Vehicle input is untrusted: :func:`decode` refuses anything that is not exactly the expected
message (bad JSON, unknown or missing fields, wrong types, oversized payloads) with a
:class:`ProtocolError` whose text says what is wrong.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError

from idlefleet.protocol.messages import WireModel

M = TypeVar("M", bound=WireModel)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class ProtocolError(ValueError):
    """A message could not be decoded into its expected type."""


def encode(message: WireModel) -> bytes:
    """Serialise ``message`` to its wire bytes (compact JSON)."""
    return message.model_dump_json(exclude_defaults=False).encode("utf-8")


def decode(kind: type[M], data: bytes) -> M:
    """Parse and validate ``data`` as a ``kind`` message, or raise :class:`ProtocolError`."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"{kind.__name__} of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
        )
    try:
        return kind.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ProtocolError(f"invalid {kind.__name__}: {problems}") from None

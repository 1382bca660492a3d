"""Hostile input for the fuzz tests: values no well-behaved client sends (huge integers, ``NaN``
and ``Infinity``, lone surrogates, deep nesting, oversized strings and lists, wrong types), the
JSON text that carries them, and strategies that break a valid message with them, field by field
(:func:`broken`) or byte by byte (:func:`garbled`). Shared by every boundary's fuzzer: the NATS
edge, the HTTP bodies, batch input lines, state traces and owner policy files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "HOSTILE_NUMBERS",
    "HOSTILE_RAW",
    "HOSTILE_TEXT",
    "Raw",
    "broken",
    "dump",
    "garbled",
    "hostile",
    "json_junk",
    "spoiled",
]


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is: what ``json.dumps`` would not write (``NaN``, a 5,000-digit
    number, 50,000 nested arrays)."""

    text: bytes


HOSTILE_TEXT = [
    "\ud800",
    "a\udfffb",
    "\x00",
    "\u202e\u0000\ufeff",
    "x" * 100_000,
    "é" * 5_000,
    "🚗" * 1_000,
    "",
    " ",
    "lease_" + "0" * 200,
    "car-1.results",
    "idlefleet.v1.uplink.car-2.results",
    "America",  # a folder of the time zone database, not a zone
    "../../etc/passwd",
    "/etc/localtime",
    'a"b\r\nX-Injected: 1',
]
HOSTILE_NUMBERS = [
    -1,
    2**31,
    2**53 + 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    10**300,
    1e308,
    -0.0,
    5e-324,
]
HOSTILE_RAW = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1" + b"0" * 5_000,
    b"9" * 400 + b".5",
    b"0x10",
    b"+1",
    b"01",
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b"[" + b"0," * 200_000 + b"0]",
    b"1" + b"0" * 2_500,  # within what the JSON parser takes; longer than any message
    b"-" + b"9" * 4_000,
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b'"\xff\xfe"',
    b'"\xc0\xaf"',
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8: not UTF-8
]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_junk = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.sampled_from(HOSTILE_NUMBERS),
    st.sampled_from([Raw(t) for t in HOSTILE_RAW]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec="utf-8"), max_size=30),
    json_junk,
)


def dump(value: Any) -> bytes:
    """JSON text of ``value``, with :class:`Raw` parts as they are and lone surrogates escaped
    (``\\ud800``), as a broken car could send them."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b",".join(dump(str(k)) + b":" + dump(v) for k, v in value.items()) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(dump(v) for v in value) + b"]"
    return json.dumps(value).encode("ascii")  # ensure_ascii: escapes; allow_nan: NaN tokens


@st.composite
def broken(draw: st.DrawFn, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with one to three of its fields (or theirs, one level down) dropped,
    replaced by hostile values or joined by unknown ones."""
    message: dict[str, Any] = copy.deepcopy(fields)
    for _ in range(draw(st.integers(1, 3))):
        target = message
        nested = [k for k, v in message.items() if isinstance(v, dict) and v]
        one_down = draw(st.booleans())
        if nested and one_down:
            target = message[draw(st.sampled_from(sorted(nested)))]
        keys = sorted(target)
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"] if keys else ["add"]))
        if action == "add":
            target[draw(st.sampled_from(["extra", "\ud800", "", "seq" * 50]))] = draw(hostile)
        elif action == "drop":
            del target[draw(st.sampled_from(keys))]
        else:
            target[draw(st.sampled_from(keys))] = draw(hostile)
    return message


@st.composite
def garbled(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with its bytes broken: cut short, spliced with bytes that are not UTF-8 (or not
    JSON), doubled, behind a byte-order mark, or replaced by junk."""
    how = draw(st.sampled_from(["cut", "splice", "double", "bom", "junk"]))
    if how == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from([b"\xff", b"\x00", b"\xc3", b"\xed\xa0\x80", b"\\", b'"']))
        return data[:at] + bad + data[at:]
    if how == "double":
        return data + data
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    return draw(st.binary(max_size=64))


@st.composite
def spoiled(draw: st.DrawFn, fields: dict[str, Any]) -> bytes:
    """The JSON text of ``fields``: two in five as they are, two in five :func:`broken`, one in
    five :func:`garbled` (so that most reach the checks behind the parser)."""
    how = draw(st.sampled_from(["intact", "fields", "bytes", "intact", "fields"]))
    if how == "intact":
        return dump(fields)
    if how == "fields":
        return dump(draw(broken(fields)))
    return draw(garbled(dump(fields)))

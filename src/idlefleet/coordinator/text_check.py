"""Text that is valid JSON but not valid Unicode: unpaired surrogate escapes such as ``"\\ud800"``.

JSON allows ``\\uD800``-``\\uDFFF`` escapes on their own; Python's ``json`` turns them into a
``str`` that cannot be encoded as UTF-8, so the request would fail later, wherever it is stored,
sent to a car or written to an output file (a batch stuck in ``validating``, a 500). Every body
is checked where it enters instead, cheaply: only text whose raw form holds such an escape is
walked at all.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["may_hold_surrogates", "surrogate_message", "unpaired_surrogate"]

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def may_hold_surrogates(raw: str | bytes) -> bool:
    """Whether raw JSON text holds a surrogate escape (paired or not); False: nothing to check."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return _SURROGATE_ESCAPE.search(data) is not None


def unpaired_surrogate(value: Any, path: str = "") -> str | None:
    """The path (``body.input[3]``, ``metadata.<key>``) of the first string or object key in
    parsed JSON ``value`` that is not valid Unicode, or None if all are."""
    if isinstance(value, str):
        return None if _valid(value) else (path or "(value)")
    if isinstance(value, dict):
        for key, item in value.items():
            if not _valid(key):
                return f"{path}.<key>" if path else "<key>"
            found = unpaired_surrogate(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unpaired_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _valid(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def surrogate_message(path: str) -> str:
    """What to tell the caller (without echoing the text, which cannot be encoded)."""
    return (
        f"Invalid value for '{path}': the text is not valid Unicode (it contains an unpaired "
        "surrogate escape such as \\ud800, which no UTF-8 text can hold)."
    )

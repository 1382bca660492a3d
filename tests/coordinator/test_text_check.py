"""Text that is JSON but not Unicode: found where it enters, by path, without false alarms."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from idlefleet.coordinator.text_check import may_hold_surrogates, unpaired_surrogate


def test_a_lone_surrogate_is_found_by_its_path_in_values_lists_and_keys() -> None:
    body = json.loads('{"model": "m", "input": ["ok", "x\\ud800y"], "user": "u"}')
    assert unpaired_surrogate(body, "body") == "body.input[1]"
    assert unpaired_surrogate(json.loads('{"a": {"\\udfff": 1}}')) == "a.<key>"
    assert unpaired_surrogate(json.loads('"\\ud83d"')) == "(value)"


def test_a_surrogate_pair_is_one_valid_character() -> None:
    raw = '{"input": "emoji \\ud83d\\ude00"}'
    assert may_hold_surrogates(raw)  # worth a look ...
    assert unpaired_surrogate(json.loads(raw)) is None  # ... and fine


def test_text_without_surrogate_escapes_is_not_walked_at_all() -> None:
    assert not may_hold_surrogates(b'{"input": "\\u00e9t\\u00e9 and plain text"}')
    assert may_hold_surrogates(b'{"input": "\\uD800"}')
    # A backslash written out before "ud800" may cost a look, which then finds nothing.
    literal = '{"input": "\\\\ud800 literally"}'
    assert unpaired_surrogate(json.loads(literal)) is None


@given(st.recursive(st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)))
def test_whatever_json_dumps_writes_is_flagged_exactly_when_it_is_not_utf8(value: object) -> None:
    raw = json.dumps(value)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    found = unpaired_surrogate(json.loads(raw)) if may_hold_surrogates(raw) else None
    assert (found is None) == encodable

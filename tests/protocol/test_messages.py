"""Hardware classes: the key that tells verification whether two cars' results compare
exactly (one class) or at the tolerance between classes."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from idlefleet.protocol.codec import ProtocolError, decode
from idlefleet.protocol.messages import Hardware, Heartbeat, hardware_class

DIGEST = "ab" * 32


def car(**fields: str) -> Hardware:
    return Hardware(accelerator="cpu", tops=1.0, memory_gb=4.0, power_w=65.0, **fields)


def test_a_class_is_a_short_key_that_is_the_same_for_the_same_class() -> None:
    key = hardware_class(car(runtime="onnxruntime 1.32.0"), DIGEST)

    assert re.fullmatch(r"[0-9a-f]{16}", key)
    # What a car says of its accelerator, speed or power is not its class.
    other_car = Hardware(
        accelerator="HW4", tops=500, memory_gb=16, power_w=400, runtime="onnxruntime 1.32.0"
    )
    assert hardware_class(other_car, DIGEST) == key
    # Stable across processes and releases of this code (it is stored and compared).
    spelled = b'[null,"onnxruntime","CPUExecutionProvider","fp32"]'
    assert hardware_class(car(), None) == hashlib.sha256(spelled).hexdigest()[:16]


def test_a_stored_hardware_json_gives_the_class_of_its_car() -> None:
    registered = car(runtime="onnxruntime 1.32.0", precision="fp16")
    stored = registered.model_dump(mode="json")

    assert hardware_class(stored, DIGEST) == hardware_class(registered, DIGEST)
    # A car registered before the class fields existed: the wire's defaults.
    old = {"accelerator": "cpu", "tops": 1.0, "memory_gb": 4.0, "power_w": 65.0}
    assert hardware_class(old, None) == hardware_class(car(), None) == hardware_class(None, None)


def test_each_of_the_four_makes_a_class_of_its_own() -> None:
    base = car(runtime="onnxruntime 1.32.0")
    keys = {
        hardware_class(base, DIGEST),
        hardware_class(base, "cd" * 32),
        hardware_class(base, None),
        hardware_class(car(runtime="onnxruntime 1.31.1"), DIGEST),
        hardware_class(car(runtime="onnxruntime 1.32.0", provider="CUDAExecutionProvider"), DIGEST),
        hardware_class(car(runtime="onnxruntime 1.32.0", precision="fp16"), DIGEST),
    }

    assert len(keys) == 6


def test_text_in_one_field_cannot_pass_for_another_class() -> None:
    # With a separator, "a|b" + "c" and "a" + "b|c" would be one key.
    a = car(runtime="onnxruntime 1.32.0|CPUExecutionProvider", provider="x")
    b = car(runtime="onnxruntime 1.32.0", provider="CPUExecutionProvider|x")

    assert hardware_class(a, DIGEST) != hardware_class(b, DIGEST)


def _beat(**fields: object) -> bytes:
    return json.dumps({"seq": 1, "status": "idle", **fields}).encode()


def test_a_heartbeat_carries_figures_and_a_location_within_bounds() -> None:
    beat = decode(
        Heartbeat,
        _beat(
            figures={"runs": 2, "compute_s": 1.5, "energy_j": 9.0, "stop_s": [0.004]},
            location=[48.14, 11.58],
        ),
    )
    assert beat.figures is not None and beat.figures.stop_s == [0.004]
    assert beat.location == (48.14, 11.58)
    assert decode(Heartbeat, _beat()).figures is None  # an idle car sends neither


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"location": [91.0, 0.0]}, "location.0"),
        ({"location": [0.0, -181.0]}, "location.1"),
        ({"location": [1.0]}, "location"),
        ({"figures": {"compute_s": float("nan")}}, "figures.compute_s"),
        ({"figures": {"energy_j": 1e300}}, "figures.energy_j"),
        ({"figures": {"runs": -1}}, "figures.runs"),
        ({"figures": {"stop_s": [0.001] * 65}}, "figures.stop_s"),
        ({"figures": {"stop_s": [float("inf")]}}, "figures.stop_s.0"),
        ({"figures": {"extra": 1}}, "figures.extra"),
    ],
)
def test_a_heartbeat_with_impossible_figures_or_place_is_refused_naming_the_field(
    fields: dict[str, object], where: str
) -> None:
    raw = json.dumps({"seq": 1, "status": "idle", **fields}, allow_nan=True).encode()
    with pytest.raises(ProtocolError, match=re.escape(where)):
        decode(Heartbeat, raw)

"""Hardware classes: the key that tells verification whether two cars' results compare
exactly (one class) or at the tolerance between classes."""

from __future__ import annotations

import hashlib
import re

from idlefleet.protocol.messages import Hardware, hardware_class

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

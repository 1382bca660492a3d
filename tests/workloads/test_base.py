"""What every workload inherits: a runner at the model's own precision, and no other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idlefleet.models.catalog import SMOLLM2
from idlefleet.workloads import WORKLOADS


def test_runner_at_the_models_own_precision_is_its_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = WORKLOADS["chat"]
    built: list[tuple[Any, ...]] = []

    def runner(*args: Any) -> str:
        built.append(args)
        return "runner"

    monkeypatch.setattr(chat, "runner", runner)

    assert chat.runner_at("fp32", SMOLLM2.id, Path("cache"), 2) == "runner"
    assert built == [(SMOLLM2.id, Path("cache"), 2, None)]


def test_runner_at_another_precision_is_refused_before_loading_anything() -> None:
    with pytest.raises(ValueError, match="runs at fp32 only, not fp16"):
        WORKLOADS["chat"].runner_at("fp16", SMOLLM2.id, Path("unused"), 1)

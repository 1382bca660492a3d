"""The agent's settings: the precision a car reports chooses the models it can serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from idlefleet.agent.config import AgentConfig
from idlefleet.models.catalog import MINILM, MODELS, SMOLLM2
from idlefleet.protocol.messages import Hardware


def config(precision: str = "fp32", models: tuple[str, ...] = ()) -> AgentConfig:
    return AgentConfig(
        vehicle_id="car-1",
        nats_url="nats://127.0.0.1:4222",
        cache_dir=Path("unused"),
        hardware=Hardware(
            accelerator="cpu", tops=1.0, memory_gb=4.0, power_w=65.0, precision=precision
        ),
        models=models,
    )


def test_an_fp32_car_serves_every_model_of_the_catalogue() -> None:
    assert config().served_models() == tuple(MODELS)


def test_an_fp16_car_serves_the_models_that_have_an_fp16_graph() -> None:
    assert config("fp16").served_models() == (MINILM.id,)
    assert config("fp16", (MINILM.id,)).served_models() == (MINILM.id,)


@pytest.mark.parametrize(
    ("precision", "models", "message"),
    [
        ("fp16", (SMOLLM2.id,), "only all-MiniLM-L6-v2 can run at precision 'fp16'"),
        ("fp16", (MINILM.id, SMOLLM2.id), "only all-MiniLM-L6-v2 can run at precision 'fp16'"),
        ("int8", (), "no model of the catalogue runs at precision 'int8'"),
    ],
)
def test_a_model_asked_for_at_a_precision_it_lacks_is_refused(
    precision: str, models: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        config(precision, models)

    assert str(refused.value) == message


def test_the_car_reports_the_provider_its_sessions_run_on() -> None:
    car = config("fp16")

    on_gpu = car.run_on(["CUDAExecutionProvider", None, "CUDAExecutionProvider"])

    assert on_gpu.hardware.provider == "CUDAExecutionProvider"
    assert on_gpu.hardware.precision == "fp16" and on_gpu.vehicle_id == car.vehicle_id
    assert car.run_on([None]) is car  # nobody says: the default (CPU) stands
    with pytest.raises(ValueError, match="a car reports one"):
        car.run_on(["CPUExecutionProvider", "CUDAExecutionProvider"])

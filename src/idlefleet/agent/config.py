"""Settings of one vehicle agent, validated when built (CLI flags and config land here)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from idlefleet.models.catalog import MODELS
from idlefleet.protocol.messages import Hardware
from idlefleet.protocol.seeds import nats_servers
from idlefleet.protocol.subjects import is_valid_vehicle_id


@dataclass(frozen=True)
class AgentConfig:
    """Who the car is, where the cloud is, and how the agent paces its work."""

    vehicle_id: str
    nats_url: str
    """One NATS URL or a comma-separated seed list (every node of a cluster: the agent fails
    over between them)."""
    cache_dir: Path
    hardware: Hardware = field(
        default_factory=lambda: Hardware(accelerator="cpu", tops=1.0, memory_gb=4.0, power_w=65.0)
    )
    """What the car reports; its ``precision`` also chooses the graphs the car builds (a model
    is served only at a precision the catalogue lists for it)."""
    threads: int = 1
    max_unit_requests: int = 256
    chunk_requests: int = 64
    """Results are sent (and the lease extended) every this many requests."""
    long_poll_s: float = 10.0
    prefetch: bool = True
    """Lease the next unit while the current one runs, so the model never waits on the wire."""
    resume_after_s: float = 300.0
    """Hysteresis: after any stop, resume only once the car has been fit to compute this long
    (in the state source's clock). BOINC's Android client waits five minutes."""
    battery_kwh: float = 75.0
    """Usable traction-battery capacity, to turn compute energy into state of charge."""
    models: tuple[str, ...] = ()
    """The catalogue's models this car serves (loads, registers and asks work for); empty:
    every model of the catalogue."""
    nkey_seed: str | None = None
    """The car's private nkey seed (``SU...``), with which it proves its identity to NATS
    (None: connect without credentials, to a server that asks for none)."""
    nats_ca: Path | None = None
    """CA certificate to verify the NATS servers' TLS with (None: NATS without TLS)."""

    def __post_init__(self) -> None:
        if not is_valid_vehicle_id(self.vehicle_id):
            raise ValueError(
                f"vehicle id {self.vehicle_id!r} must be 1-64 letters, digits, '_' or '-'"
            )
        nats_servers(self.nats_url)  # raises ValueError naming the bad entry
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if not 1 <= self.chunk_requests <= self.max_unit_requests <= 10_000:
            raise ValueError("need 1 <= chunk_requests <= max_unit_requests <= 10000")
        if not 0 <= self.long_poll_s <= 30:
            raise ValueError("long_poll_s must be between 0 and 30")
        if not 0 <= self.resume_after_s <= 86_400:
            raise ValueError("resume_after_s must be between 0 and 86400 seconds")
        if not 1 <= self.battery_kwh <= 1000:
            raise ValueError("battery_kwh must be between 1 and 1000")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; the catalogue has {', '.join(MODELS)}")
        precision = self.hardware.precision
        if not self.served_models() or any(
            precision not in MODELS[m].precisions for m in self.models
        ):
            able = [m for m in MODELS if precision in MODELS[m].precisions]
            raise ValueError(
                f"no model of the catalogue runs at precision {precision!r}"
                if not able
                else f"only {', '.join(able)} can run at precision {precision!r}"
            )

    def run_on(self, providers: Iterable[str | None]) -> AgentConfig:
        """This config with the execution provider the car's sessions say they run on (each
        runner's ``provider``; None: it does not say) in its ``hardware``: ONNX Runtime may
        choose another than the one asked for. ``ValueError`` if they name more than one (a
        car reports one); unchanged if none says."""
        named = {p for p in providers if p is not None}
        if len(named) > 1:
            raise ValueError(f"models run on {' and '.join(sorted(named))}; a car reports one")
        if not named:
            return self
        return replace(self, hardware=self.hardware.model_copy(update={"provider": named.pop()}))

    def served_models(self) -> tuple[str, ...]:
        """What ``models`` says, in catalogue order (if it is empty: every model the
        catalogue lists at the car's precision)."""
        precision = self.hardware.precision
        return tuple(
            m
            for m in MODELS
            if (m in self.models if self.models else precision in MODELS[m].precisions)
        )

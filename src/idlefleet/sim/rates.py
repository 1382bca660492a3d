"""What the cloud must carry for a fleet, per region, and how many servers that takes.

The fleet model says how many cars are opted in, driving, parked and computing, and when; the
plan for 10⁸ cars needs that turned into messages, bytes and durable writes per second per
region, and into NATS nodes, coordinator replicas and PostgreSQL primaries. Everything here is
pure arithmetic on a parsed ``summary.json`` (and optionally the columns of its time series),
so each figure can be checked by hand. The traffic the protocol makes per car and what one
server can take are not things the model knows: they are explicit, validated assumptions
(`TrafficAssumptions`, `ScaleLimits`) whose docstrings give the source of each default.

Per-region figures use each region's share of the fleet (``params.regions``) and the fleet's
per-car figures, because ``summary.json`` reports no region on its own; a region may instead be
given its own single-region run (`regional_figures`), whose per-car figures and peaks then
replace the fleet's. Sizing uses peak rates: connections and heartbeats do not follow the day,
compute-driven rates scale by the peak ÷ mean of computing cars, and events that follow trips
(reconnects, session ends) by the peak ÷ mean of driving cars, both from the time series.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from idlefleet.sim.rates_inputs import (
    FleetFigures,
    Peaks,
    RatesInputError,
    figures_from_summary,
    peaks_from_timeseries,
    regional_figures,
)

__all__ = [
    "FleetFigures",
    "FleetPlan",
    "Need",
    "Peaks",
    "Rates",
    "RatesInputError",
    "RegionPlan",
    "ScaleLimits",
    "TrafficAssumptions",
    "figures_from_summary",
    "peaks_from_timeseries",
    "plan_fleet",
    "regional_figures",
]

DAY_S = 86_400.0
MONTH_S = 365.25 / 12 * DAY_S
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TrafficAssumptions(_Model):
    """What the work protocol sends per car; none of it comes from the fleet model."""

    heartbeat_interval_s: Positive = 30.0
    """Seconds between a connected car's heartbeats at scale (DESIGN.md: 10⁸ cars every 30 s =
    3.3 M messages/s; the coordinator's own default is 5 s, for small fleets)."""
    messages_per_request: Positive = 2.0
    """NATS messages per request/reply exchange: the request and its reply."""
    connected_share_opted_in: Share = 1.0
    """Share of opted-in cars whose agent holds its connection at any moment. 1 (the default)
    is the conservative plan: connected driving and parked. Never fewer than the cars
    computing at the peak are counted, since a car must be connected to compute."""
    connected_share_not_opted_in: Share = 0.0
    """Share of cars NOT opted in that hold a connection. 0 by default (their agent is off);
    the agent as written connects whatever the policy, so 1 is the plan if every car runs it."""
    event_heartbeats_per_trip: NonNegative = 2.0
    """Extra heartbeats per trip of a connected car: the agent beats at once whenever the
    guard's verdict changes, i.e. on leaving and on arriving."""
    event_heartbeats_per_session: NonNegative = 2.0
    """Extra heartbeats per compute session: when computing becomes allowed and when it stops."""
    reconnect_on: Literal["trip", "compute_session"] = "trip"
    """When a connected car reconnects and so registers again: after every trip (its network
    changes on arrival; the larger count) or only at the start of each compute session (the
    car sleeps offline between sessions)."""
    utilization: Share | None = None
    """Share of allowed compute time with work to do; None takes the simulator's
    ``economics.utilization`` from the summary (its default 1 is an upper bound)."""
    unit_compute_s: Positive = 120.0
    """Seconds of compute per work unit, so leases per computing car per second = 1 / this."""
    sentences_per_compute_s: Positive = 400.0
    """Sentences a computing car embeds per second with all-MiniLM-L6-v2: FIELD-NOTES.md
    measured 360-440 on 2 CPU cores (DESIGN.md: ~500); an accelerator would be faster."""
    sentences_per_result_chunk: Positive = 64.0
    """Sentences per result message, each one request/reply and one durable commit (the agent
    sends 64 requests of one text each per chunk today)."""
    result_bytes_per_sentence: Positive = 2048.0
    """Result bytes on the wire per sentence: a 384-dim float32 vector, 1,536 bytes, in base64
    (× 4/3). The message envelope is counted in ``control_message_bytes``."""
    input_bytes_per_sentence: NonNegative = 100.0
    """Input text per sentence in a work grant, JSON-quoted (assumed: short sentences)."""
    control_message_bytes: NonNegative = 200.0
    """Bytes of every NATS message besides its payload: subject, headers, JSON envelope, or the
    whole of a heartbeat (FIELD-NOTES.md's nats-py figures use 200-byte messages)."""
    stored_bytes_per_sentence: NonNegative = 3584.0
    """Bytes written to the store per result: the raw float32 vector (1,536) when it commits,
    and its base64 line of the output file (~2,048) when the batch is finalised; row and index
    overhead not counted."""
    policy_changes_per_owner_month: NonNegative = 1.0
    """Policy changes per connected car's owner per month, each one push to the car and one
    durable policy version (an assumption: no usage data yet)."""
    liveness_flush_interval_s: Positive = 300.0
    """Heartbeats stay in memory (DESIGN principle 7); the last one per car is written once per
    this many seconds."""
    liveness_rows_per_transaction: Positive = 1000.0
    """Cars' liveness rows written per transaction in a flush (one batched UPDATE)."""


class ScaleLimits(_Model):
    """What one server can take; assumptions with sources, to be replaced by measurements."""

    nats_connections_per_node: Positive = 50_000.0
    """Connections one nats-server holds: Choria runs 50,000 nodes on one broker in 1-1.5 GB of
    RAM; the server's configured default maximum is 65,536."""
    nats_messages_per_node_s: Positive = 2_000_000.0
    """Messages per second one nats-server routes (an assumption, conservative for small
    messages: 1-3 M/s; not measured here)."""
    nats_bytes_per_node_s: Positive = 1.25e9
    """Payload bytes per second one nats-server moves: a 10 Gbit/s NIC, each byte in on one
    direction and out on the other (an assumption)."""
    nats_hops_per_message: Positive = 2.0
    """Servers each message passes through: the car's and the coordinator's, which differ in a
    cluster of many nodes (1 if coordinators connect to every node)."""
    nats_max_payload_bytes: Positive = 1_048_576.0
    """The server's maximum message payload (default 1 MiB); larger units and results must go
    through the object store. Only checked, not sized."""
    coordinator_heartbeats_per_replica_s: Positive = 10_000.0
    """Heartbeats per second one coordinator replica answers: issue #9's target on 2 cores;
    ``bench/dispatch.py`` measured 9,300-12,300 with SQLite (2 cores shared with the load
    generator and nats-server)."""
    coordinator_work_ops_per_replica_s: Positive = 1_500.0
    """Leases, result commits, releases, registrations and policy pushes per second one replica
    serves: ``bench/dispatch.py`` measured ~780 leases/s each with its result commit, i.e.
    ~1,560 work ops/s, on SQLite on 2 shared cores. A replica's CPU serves both kinds, so the
    two loads add up."""
    postgres_transactions_per_primary_s: Positive = 10_000.0
    """Durable transactions per second one PostgreSQL primary commits with group commit on NVMe
    (an assumption)."""
    postgres_write_bytes_per_primary_s: Positive = 500e6
    """Bytes per second one primary writes durably, WAL and table (an assumption for one WAL
    stream on NVMe)."""


@dataclass(frozen=True)
class Rates:
    """Counts (cars) and per-second rates of one region, or of the whole fleet."""

    cars: float
    opted_in_cars: float
    connected_cars: float
    """Also the NATS connections (coordinators add a handful)."""
    computing_cars: float
    heartbeats_per_s: float
    registrations_per_s: float
    leases_per_s: float
    result_chunks_per_s: float
    result_bytes_per_s: float
    input_bytes_per_s: float
    releases_per_s: float
    policy_pushes_per_s: float
    nats_messages_per_s: float
    nats_bytes_per_s: float
    coordinator_work_ops_per_s: float
    liveness_rows_per_s: float
    durable_transactions_per_s: float
    durable_bytes_per_s: float

    def __add__(self, other: Rates) -> Rates:
        mine, theirs = asdict(self), asdict(other)
        return Rates(**{key: value + theirs[key] for key, value in mine.items()})


@dataclass(frozen=True)
class Need:
    """Servers of one kind. ``loads``: demand ÷ one server's limit, per limit; ``demand``: the
    servers needed before rounding up (the largest load, or their sum where the limits share
    one resource); ``binding``: the limit with the largest load, the one that fails first."""

    loads: dict[str, float]
    demand: float
    servers: int
    binding: str


@dataclass(frozen=True)
class RegionPlan:
    """One region's traffic at the mean and at the peak, and the servers its peak needs."""

    name: str
    share: float
    mean: Rates
    peak: Rates
    """Sized for: compute- and trip-driven rates at their peak, the rest as at the mean."""
    nats: Need
    coordinators: Need
    postgres: Need
    first_to_fail: str
    """``system: limit`` with the largest load of all: what breaks first as the fleet grows."""
    peaks: Peaks
    figures_source: str


@dataclass(frozen=True)
class FleetPlan:
    """Every region's plan, their total, and what the plan assumed."""

    vehicles: float
    regions: tuple[RegionPlan, ...]
    total: RegionPlan
    """Sums over the regions (each region at its own peak); servers are summed as deployed."""
    traffic: TrafficAssumptions
    limits: ScaleLimits
    figures: FleetFigures
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: assumptions, inputs, every region and the total, and the notes."""
        return {
            "vehicles": self.vehicles,
            "traffic_assumptions": self.traffic.model_dump(),
            "limits": self.limits.model_dump(),
            "figures": asdict(self.figures),
            "regions": [asdict(region) for region in self.regions],
            "total": asdict(self.total),
            "notes": list(self.notes),
        }


# -- rates and servers -----------------------------------------------------------------------


def _rates(
    cars: float, connected: float, fig: FleetFigures, peaks: Peaks, traffic: TrafficAssumptions
) -> Rates:
    t = traffic
    opted = cars * fig.opted_in_share
    utilization = fig.utilization if t.utilization is None else t.utilization
    computing = cars * fig.computing_share * peaks.computing
    busy = computing * utilization
    trips = connected * fig.trips_per_vehicle_day / DAY_S * peaks.driving
    sessions = opted * fig.sessions_per_opted_in_vehicle_day / DAY_S * peaks.driving
    heartbeats = (
        connected / t.heartbeat_interval_s
        + trips * t.event_heartbeats_per_trip
        + sessions * t.event_heartbeats_per_session
    )
    registrations = trips if t.reconnect_on == "trip" else sessions
    leases = busy / t.unit_compute_s
    sentences = busy * t.sentences_per_compute_s
    chunks = sentences / t.sentences_per_result_chunk
    releases = sessions * utilization  # the agent gives its lease back when the gate stops it
    pushes = connected * t.policy_changes_per_owner_month / MONTH_S
    work_ops = leases + chunks + releases + registrations + pushes
    messages = (heartbeats + work_ops) * t.messages_per_request
    result_bytes = sentences * t.result_bytes_per_sentence
    input_bytes = sentences * t.input_bytes_per_sentence
    liveness_rows = connected / t.liveness_flush_interval_s
    return Rates(
        cars=cars,
        opted_in_cars=opted,
        connected_cars=connected,
        computing_cars=computing,
        heartbeats_per_s=heartbeats,
        registrations_per_s=registrations,
        leases_per_s=leases,
        result_chunks_per_s=chunks,
        result_bytes_per_s=result_bytes,
        input_bytes_per_s=input_bytes,
        releases_per_s=releases,
        policy_pushes_per_s=pushes,
        nats_messages_per_s=messages,
        nats_bytes_per_s=result_bytes + input_bytes + messages * t.control_message_bytes,
        coordinator_work_ops_per_s=work_ops,
        liveness_rows_per_s=liveness_rows,
        durable_transactions_per_s=work_ops + liveness_rows / t.liveness_rows_per_transaction,
        durable_bytes_per_s=sentences * t.stored_bytes_per_sentence,
    )


def _need(loads: dict[str, float], *, additive: bool = False) -> Need:
    demand = math.fsum(loads.values()) if additive else max(loads.values())
    # A load a rounding error above a whole number must not cost a whole server more.
    servers = math.ceil(round(demand, 9))
    return Need(loads, demand, servers, binding=max(loads, key=loads.__getitem__))


def _needs(peak: Rates, limits: ScaleLimits) -> tuple[Need, Need, Need]:
    hops = limits.nats_hops_per_message
    nats = _need(
        {
            "connections": peak.connected_cars / limits.nats_connections_per_node,
            "messages/s": peak.nats_messages_per_s * hops / limits.nats_messages_per_node_s,
            "bytes/s": peak.nats_bytes_per_s * hops / limits.nats_bytes_per_node_s,
        }
    )
    coordinators = _need(
        {
            "heartbeats/s": peak.heartbeats_per_s / limits.coordinator_heartbeats_per_replica_s,
            "work ops/s": peak.coordinator_work_ops_per_s
            / limits.coordinator_work_ops_per_replica_s,
        },
        additive=True,  # one replica's CPU serves both
    )
    postgres = _need(
        {
            "transactions/s": peak.durable_transactions_per_s
            / limits.postgres_transactions_per_primary_s,
            "bytes/s": peak.durable_bytes_per_s / limits.postgres_write_bytes_per_primary_s,
        }
    )
    return nats, coordinators, postgres


def _first_to_fail(nats: Need, coordinators: Need, postgres: Need) -> str:
    systems = {"nats": nats, "coordinator": coordinators, "postgres": postgres}
    system = max(systems, key=lambda name: systems[name].demand)
    return f"{system}: {systems[system].binding}"


def _connected(cars: float, fig: FleetFigures, t: TrafficAssumptions) -> float:
    opted = cars * fig.opted_in_share
    return opted * t.connected_share_opted_in + (cars - opted) * t.connected_share_not_opted_in


def _notes(traffic: TrafficAssumptions, limits: ScaleLimits, raised: list[str]) -> list[str]:
    notes = []
    unit_input = (
        traffic.unit_compute_s * traffic.sentences_per_compute_s * traffic.input_bytes_per_sentence
    )
    if unit_input + traffic.control_message_bytes > limits.nats_max_payload_bytes:
        notes.append(
            f"a {traffic.unit_compute_s:g} s unit carries {unit_input:,.0f} bytes of input, "
            f"above the {limits.nats_max_payload_bytes:,.0f}-byte NATS max payload: grants must "
            "point into the object store or be cut"
        )
    chunk = traffic.sentences_per_result_chunk * traffic.result_bytes_per_sentence
    if chunk + traffic.control_message_bytes > limits.nats_max_payload_bytes:
        notes.append(
            f"a result chunk of {chunk:,.0f} bytes is above the "
            f"{limits.nats_max_payload_bytes:,.0f}-byte NATS max payload"
        )
    if raised:
        notes.append(
            f"connections in {', '.join(raised)} raised to the peak computing cars (a car must be "
            "connected to compute)"
        )
    return notes


def plan_fleet(
    figures: FleetFigures,
    traffic: TrafficAssumptions,
    limits: ScaleLimits,
    *,
    vehicles: float | None = None,
    peaks: Peaks | None = None,
    regional: Mapping[str, tuple[FleetFigures, Peaks]] | None = None,
) -> FleetPlan:
    """Rates and servers per region and in total for ``vehicles`` cars (default: the run's).

    Each region gets its share of the cars and the fleet's per-car ``figures`` and ``peaks``
    (default: none, rates at the mean), unless ``regional`` gives it figures and peaks of its
    own (see `regional_figures`).
    """
    if vehicles is not None and not (math.isfinite(vehicles) and vehicles > 0):
        raise RatesInputError(f"vehicles: must be a positive, finite number, got {vehicles!r}")
    fleet_cars = float(figures.model_vehicles if vehicles is None else vehicles)
    regional = regional or {}
    names = [name for name, _ in figures.regions]
    if unknown := sorted(set(regional) - set(names)):
        raise RatesInputError(f"{', '.join(unknown)}: not a region of the run ({', '.join(names)})")
    plans, raised = [], []
    for name, share in figures.regions:
        fig, pk = regional.get(name, (figures, peaks or Peaks()))
        cars = fleet_cars * share
        peak_computing = cars * fig.computing_share * pk.computing
        connected = _connected(cars, fig, traffic)
        if peak_computing > connected:
            connected = peak_computing
            raised.append(name)
        peak = _rates(cars, connected, fig, pk, traffic)
        mean = _rates(cars, connected, fig, Peaks(), traffic)
        nats, coordinators, postgres = _needs(peak, limits)
        first = _first_to_fail(nats, coordinators, postgres)
        plans.append(
            RegionPlan(name, share, mean, peak, nats, coordinators, postgres, first, pk, fig.source)
        )
    notes = tuple(_notes(traffic, limits, raised))
    return FleetPlan(fleet_cars, tuple(plans), _total(plans), traffic, limits, figures, notes)


def _total(plans: list[RegionPlan]) -> RegionPlan:
    mean, peak = plans[0].mean, plans[0].peak
    for plan in plans[1:]:
        mean, peak = mean + plan.mean, peak + plan.peak

    def summed(kind: str) -> Need:
        needs: list[Need] = [getattr(plan, kind) for plan in plans]
        loads = {key: math.fsum(n.loads[key] for n in needs) for key in needs[0].loads}
        return Need(
            loads=loads,
            demand=math.fsum(n.demand for n in needs),
            servers=sum(n.servers for n in needs),
            binding=max(loads, key=loads.__getitem__),
        )

    nats, coordinators, postgres = summed("nats"), summed("coordinators"), summed("postgres")
    return RegionPlan(
        name="total",
        share=math.fsum(plan.share for plan in plans),
        mean=mean,
        peak=peak,
        nats=nats,
        coordinators=coordinators,
        postgres=postgres,
        first_to_fail=_first_to_fail(nats, coordinators, postgres),
        peaks=Peaks(source="each region at its own peak"),
        figures_source="; ".join(sorted({plan.figures_source for plan in plans})),
    )

"""The fleet model: one chunk of cars through every simulated day, vectorised over the cars.

For each day: draw the trip chains (`trips`), then walk the seven parked windows in order. At
each arrival the driver decides whether to plug in (home, work or public charger, or a fast
charger when low); between windows the trip drains the battery (with an en-route fast charge
when it would fall below the reserve). Inside a window the car may compute only where the
owner's policy allows, with the same rules as the car's guard: opted in; plugged in if the
policy says charging only; inside the allowed intervals of the day (`rules`: hours, departure,
temperatures); above the state-of-charge floor; under the daily energy cap (reset at local
midnight); and only after the guard's hysteresis (``resume_after_min``) following the last
blocker (arrival, the start of allowed hours, the charge rising above the floor). The charge
follows in closed form (`energy`). A compute session that is still running when the driver
leaves is a preemption.

Everything is arrays over the chunk's cars: the cost per vehicle-day is a fixed number of array
operations, not a loop over time steps, which is what lets a laptop simulate millions of cars.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from idlefleet.sim.context import FleetContext, chunk_rng
from idlefleet.sim.energy import charge, compute
from idlefleet.sim.population import Population, sample_population
from idlefleet.sim.rules import DAY_MIN
from idlefleet.sim.tally import EARNINGS_EDGES, Tally, length_bins
from idlefleet.sim.trips import PUBLIC, WINDOWS, WORK, sample_day

__all__ = ["Accounts", "ChunkRecord", "simulate_chunk"]

Arr = np.ndarray
_DAYS_PER_MONTH = 365.25 / 12
_NEVER = 1e7
"""A wait longer than any window (minutes), for a car that cannot charge back above its floor."""


@dataclass
class Accounts:
    """Per-car energy accounts (kWh) over the run, for conservation checks and traces."""

    initial_kwh: np.ndarray
    final_kwh: np.ndarray
    grid_kwh: np.ndarray
    """Grid energy through chargers at parked windows (charging and feeding the computer)."""
    fast_grid_kwh: np.ndarray
    """Grid energy of en-route fast charges."""
    drive_kwh: np.ndarray
    compute_kwh: np.ndarray
    min_kwh: np.ndarray
    max_kwh: np.ndarray
    efficiency: float


@dataclass
class ChunkRecord:
    """Everything each car did, for turning a few cars into state traces (small chunks only).

    ``trips``: (vehicle, day, depart, arrive, kWh before, kWh after).
    ``windows``: (vehicle, day, start, end, place, charger kW, kWh at start, kWh at end).
    ``sessions``: (vehicle, day, start, end, kWh at start, kWh at end).
    """

    population: Population
    trips: list[tuple[int, int, float, float, float, float]] = field(default_factory=list)
    windows: list[tuple[int, int, float, float, int, float, float, float]] = field(
        default_factory=list
    )
    sessions: list[tuple[int, int, float, float, float, float]] = field(default_factory=list)


def _add_intervals(
    start: np.ndarray,
    end: np.ndarray,
    category: np.ndarray,
    categories: int,
    base: np.ndarray,
    period: int,
) -> np.ndarray:
    """Difference arrays (category, minute) of the non-empty intervals [start, end).

    ``start`` and ``end`` are minutes of the local day, (k, n): k intervals of each of n cars;
    ``category`` and ``base`` (the car's UTC minute of local midnight) are per car (n,). Times
    are non-negative, so casting to an integer floors them.
    """
    keep = end > start
    cols = np.broadcast_to(np.arange(start.shape[1]), start.shape)[keep]
    offset = base[cols]
    s = start[keep].astype(np.int64) + offset
    e = end[keep].astype(np.int64) + offset
    cat = category[cols].astype(np.int64)
    s_mod, e_mod = s % period, e % period
    wrapped = (e_mod < s_mod) | (e - s >= period)
    width = period + 1
    cat *= width
    diff = np.bincount(cat + s_mod, minlength=categories * width).astype(np.float64)
    diff -= np.bincount(cat + e_mod, minlength=categories * width)
    diff = diff.reshape(categories, width)
    diff[:, 0] += np.bincount(cat[wrapped] // width, minlength=categories)
    return diff


def simulate_chunk(
    ctx: FleetContext, chunk: int, n: int, record: bool = False
) -> tuple[Tally, Accounts, ChunkRecord | None]:
    """Simulate ``n`` cars (chunk number ``chunk`` of the run) through every day."""
    p = ctx.params
    ch, econ = p.charging, p.economics
    rng = chunk_rng(p.seed, chunk)
    pop = sample_population(rng, n, p)
    period = p.days * 1440
    tally = Tally(period_min=period)
    rec = ChunkRecord(pop) if record else None
    hw_n, regions = len(p.hardware), ctx.regions

    cap = pop.battery_kwh
    limit = ch.charge_limit_soc * cap
    eta = ch.efficiency
    tops = ctx.tops[pop.hardware]
    c_kw = ctx.compute_kw[pop.hardware] * econ.utilization
    floor = ctx.floor_fraction[pop.profile] * cap
    charging_only = ctx.charging_only[pop.profile]
    combo = pop.profile.astype(np.int64) * regions + pop.region
    offset = ctx.utc_offset_min[pop.region]
    resume = np.float32(p.resume_after_min)
    opted = pop.opted_in
    has_home = pop.home_kw > 0
    km_kwh = p.travel.speed_kmh / 60 * p.travel.kwh_per_km

    e = pop.initial_kwh.copy()
    acc = Accounts(
        initial_kwh=pop.initial_kwh,
        final_kwh=e,
        grid_kwh=np.zeros(n),
        fast_grid_kwh=np.zeros(n),
        drive_kwh=np.zeros(n),
        compute_kwh=np.zeros(n),
        min_kwh=e.copy(),
        max_kwh=e.copy(),
        efficiency=eta,
    )
    sustained_tops_min = np.zeros(n)
    plug_kw = np.zeros(n)  # the charger the car stands at now (carried over midnight)
    settled = np.zeros(n, bool)  # computing at midnight: no new hysteresis at 00:00
    carry_session = np.zeros(n, np.float32)
    carry_parked = np.zeros(n, np.float32)
    drive_cat = pop.hardware.astype(np.int64) * 2 + opted
    no_category = np.zeros(n, np.int64)
    compute_cat = pop.hardware.astype(np.int64) * regions + pop.region
    hw_tops = ctx.tops
    # Every car is parked unless driving: start the parked series at the whole chunk.
    tally.series[0, 0] += n
    tally.series[2, 0] += tops.sum()
    tally.series[3, 0] += tops[opted].sum()

    for day in range(p.days):
        weekend = (p.start_weekday + day) % 7 >= 5
        plan = sample_day(rng, pop.commuter, weekend, p.travel)
        w_start, w_end = plan.window_start, plan.window_end
        day_start, day_end = ctx.allowed_start[day], ctx.allowed_end[day]
        sustained = ctx.sustained[pop.hardware] * ctx.derate[day][pop.region]
        cap_left = ctx.cap_kwh[pop.profile].copy()
        base = day * 1440 - offset
        plugged_w = np.zeros((WINDOWS, n), bool)
        sess_idx: list[np.ndarray] = []
        sess_start: list[np.ndarray] = []
        sess_end: list[np.ndarray] = []
        trip_min = plan.trip_minutes
        u_plug = rng.random((WINDOWS, n), dtype=np.float32)
        u_fast = rng.random((WINDOWS, n), dtype=np.float32)
        next_settled = np.zeros(n, bool)
        next_carry_session = np.zeros(n, np.float32)
        continued = np.zeros(n, bool)

        for j in range(WINDOWS):
            t0 = w_start[j]
            t1 = w_end[j]
            if j:
                # Only the cars that drive trip j-1 (later tours are often not taken).
                drove = np.flatnonzero(trip_min[j - 1] > 0)
                de = e[drove]
                trip_kwh = trip_min[j - 1, drove] * km_kwh
                need = trip_kwh + ch.reserve_soc * cap[drove] - de
                fast = need > 0
                top_up = np.where(fast, np.maximum(need, limit[drove] - de), 0.0)
                e[drove] = de + top_up - trip_kwh
                acc.fast_grid_kwh[drove] += top_up / eta
                acc.drive_kwh[drove] += trip_kwh
                tally.fast_charges += np.count_nonzero(fast)
                acc.min_kwh[drove] = np.minimum(acc.min_kwh[drove], e[drove])
                if rec is not None:
                    _record_trips(
                        rec,
                        day,
                        plan.depart[j - 1, drove],
                        plan.arrive[j - 1, drove],
                        de + top_up,
                        e[drove],
                        drove,
                    )
            # Window j > 0 exists only for cars that drove trip j-1; work on those alone.
            idx = None if j == 0 else np.flatnonzero(t1 > t0)

            def pick(a: Arr, idx: Arr | None = idx) -> Arr:
                return a if idx is None else a[idx]

            t0s, t1s, es, caps = pick(t0), pick(t1), pick(e), pick(cap)
            if j == 0 and day:
                kw = plug_kw.copy()  # still standing at home, plugged in or not, since last night
            elif j % 2 == 0:
                want = pick(has_home) & (
                    (es < ch.plug_below_soc * caps) | (pick(u_plug[j]) < ch.plug_habit)
                )
                kw = np.where(want, pick(pop.home_kw), 0.0)
            else:
                place = pick(plan.place[j])
                u = pick(u_plug[j])
                use_fast = (es < ch.fast_below_soc * caps) & (pick(u_fast[j]) < ch.fast_prob)
                public = np.where(
                    use_fast,
                    ch.fast_charger_kw,
                    np.where(u < ch.public_plug_prob, ch.public_charger_kw, 0.0),
                )
                at_work = np.where(u < ch.work_plug_prob, pick(pop.work_kw), 0.0)
                kw = np.where(place == WORK, at_work, np.where(place == PUBLIC, public, 0.0))
            if idx is None:
                plug_kw = kw
            else:
                plug_kw[idx] = kw
            plugged = kw > 0
            plugged_w[j, slice(None) if idx is None else idx] = plugged
            r_kw = eta * kw
            eligible = pick(opted) & (plugged | ~pick(charging_only)) & (t1s > t0s)
            e_window = e.copy() if rec is not None else e
            t = t0s.astype(np.float64)
            # Only cars that may compute in this window at all are followed interval by interval.
            local = np.flatnonzero(eligible & (pick(cap_left) > 0))
            cand = local if idx is None else idx[local]
            if cand.size:
                ce, ct, ccap = e[cand], t[local], cap_left[cand]
                ct0, ct1 = t0[cand], t1[cand]
                ckw, cr, climit, cfloor, cc = (
                    kw[local],
                    r_kw[local],
                    limit[cand],
                    floor[cand],
                    c_kw[cand],
                )
                csettled = settled[cand] if j == 0 else None
                cgrid = np.zeros(cand.size)
                cused = np.zeros(cand.size)
                csust = np.zeros(cand.size)
                # The allowed intervals of these cars only (most cars never get here).
                c_start, c_end = day_start[combo[cand]], day_end[combo[cand]]
                for i in range(c_start.shape[1]):
                    lo = np.maximum(ct0, c_start[:, i])
                    hi = np.minimum(ct1, c_end[:, i])
                    if csettled is not None:
                        a = lo + np.where(csettled & (lo == 0), np.float32(0), resume)
                    else:
                        a = lo + resume
                    ok = (a < hi) & (ccap > 0)
                    if not ok.any():
                        continue
                    # At or below the floor, the car must first charge past it; the guard's
                    # hysteresis then runs from that moment (the charge only rises meanwhile).
                    with np.errstate(divide="ignore", invalid="ignore"):
                        past_floor = np.where(
                            ce > cfloor,
                            -_NEVER,
                            np.where(
                                (cr > 0) & (climit > cfloor), ct + (cfloor - ce) * 60 / cr, _NEVER
                            ),
                        )
                    start = np.maximum(a, past_floor + resume)
                    ok &= start < hi
                    e_s, g1 = charge(ce, start - ct, cr, climit, ckw)
                    run, e_c, g3, used, by_cap, by_floor = compute(
                        e_s, hi - start, ccap, cfloor, cc, cr, climit, ckw, eta
                    )
                    run = np.where(ok, run, 0.0)
                    stop = start + run
                    ce = np.where(ok, e_c, ce)
                    ct = np.where(ok, stop, ct)
                    cgrid += np.where(ok, g1 + g3, 0.0)
                    used = np.where(ok, used, 0.0)
                    cused += used
                    ccap = ccap - used
                    csust += run
                    sess_idx.append(cand[ok])
                    sess_start.append(start[ok])
                    sess_end.append(stop[ok])
                    if rec is not None:
                        _record_sessions(rec, day, cand, ok, start, stop, e_s, e_c)
                    # How the session ended, and whether it runs on past midnight.
                    to_end = ok & ~by_cap & ~by_floor & (stop >= hi)
                    departed = to_end & (hi >= ct1) & (ct1 < DAY_MIN)
                    midnight = to_end & (hi >= DAY_MIN)
                    session_len = run
                    if csettled is not None:
                        joined = ok & csettled & (start <= 0)
                        continued[cand[joined]] = True
                        session_len = run + np.where(joined, carry_session[cand], 0.0)
                    finished = ok & ~midnight
                    tally.session_hist += np.bincount(
                        length_bins(session_len[finished]), minlength=len(tally.session_hist)
                    )
                    tally.sessions += np.count_nonzero(finished)
                    tally.ended_departure += np.count_nonzero(departed)
                    tally.ended_cap += np.count_nonzero(ok & by_cap)
                    tally.ended_floor += np.count_nonzero(ok & by_floor)
                    tally.ended_hours += np.count_nonzero(to_end & ~departed & ~midnight)
                    next_settled[cand[midnight]] = True
                    next_carry_session[cand[midnight]] = session_len[midnight]
                e[cand] = ce
                t[local] = ct
                cap_left[cand] = ccap
                acc.grid_kwh[cand] += cgrid
                acc.compute_kwh[cand] += cused
                sustained_tops_min[cand] += sustained[cand] * csust
            at = np.flatnonzero(plugged & (t1s > t0s))
            at_charger = at if idx is None else idx[at]
            e_end, g_end = charge(
                e[at_charger], t1s[at] - t[at], r_kw[at], limit[at_charger], kw[at]
            )
            e[at_charger] = e_end
            acc.grid_kwh[at_charger] += g_end
            acc.max_kwh[at_charger] = np.maximum(acc.max_kwh[at_charger], e_end)
            if rec is not None:
                who = np.arange(n) if idx is None else idx
                _record_windows(
                    rec, day, who, t0[who], t1[who], plan.place[j, who], kw, e_window[who], e[who]
                )

        # A session carried into today that did not go on at 00:00 ended at midnight.
        carried_ended = settled & ~continued
        tally.session_hist += np.bincount(
            length_bins(carry_session[carried_ended]), minlength=len(tally.session_hist)
        )
        tally.sessions += np.count_nonzero(carried_ended)
        tally.ended_hours += np.count_nonzero(carried_ended)
        settled, carry_session = next_settled, next_carry_session

        # Parked windows: lengths (joined across midnight at home) and time series.
        own = w_end - w_start
        length = own.copy()
        length[0] += carry_parked
        ends_today = (w_end < DAY_MIN) & (length > 0)
        tally.parked_hist += np.bincount(
            length_bins(length[ends_today]), minlength=len(tally.parked_hist)
        )
        at_midnight = (w_end >= DAY_MIN) & (own > 0)
        carry_parked = (length * at_midnight).sum(axis=0)

        driven = trip_min.sum(axis=0, dtype=np.float64)
        span = 1440.0 - driven  # every minute of the day is spent parked or driving
        tally.parked_min += float(span.sum())
        tally.plugged_min += float((own * plugged_w).sum(dtype=np.float64))
        tally.parked_tops_min += float((tops * span).sum())
        tally.opted_parked_tops_min += float((tops * span)[opted].sum())
        tally.drive_min += float(driven.sum())
        tally.trips += np.count_nonzero(trip_min > 0)

        # Parked = the whole fleet minus the cars driving, so only the trips (about three a
        # day) are binned for the parked series; the plugged series bins plugged windows only.
        driving = _add_intervals(
            plan.depart, plan.arrive, drive_cat, hw_n * 2, base, period
        ).reshape(hw_n, 2, -1)
        tally.series[0] -= driving.sum(axis=(0, 1))
        tally.series[2] -= np.tensordot(hw_tops, driving.sum(axis=1), axes=1)
        tally.series[3] -= np.tensordot(hw_tops, driving[:, 1], axes=1)
        rows, cols = np.nonzero(plugged_w)
        tally.series[1] += _add_intervals(
            w_start[rows, cols][None, :],
            w_end[rows, cols][None, :],
            no_category[cols],
            1,
            base[cols],
            period,
        )[0]

        if sess_idx:
            who = np.concatenate(sess_idx)
            s_all = np.concatenate(sess_start)
            e_all = np.concatenate(sess_end)
            run_min = e_all - s_all
            tally.compute_min += float(run_min.sum())
            tally.computing_tops_min += float((tops[who] * run_min).sum())
            tally.sustained_tops_min += float((sustained[who] * run_min).sum())
            by_class = _add_intervals(
                s_all[None, :], e_all[None, :], compute_cat[who], hw_n * regions, base[who], period
            ).reshape(hw_n, regions, -1)
            tally.series[4] += by_class.sum(axis=(0, 1))
            tally.series[5] += np.tensordot(hw_tops, by_class.sum(axis=1), axes=1)
            weights = ctx.sustained[:, None] * ctx.derate[day][None, :]
            tally.series[6] += np.tensordot(weights, by_class, axes=2)
            tally.series[7] += np.tensordot(
                ctx.compute_kw * econ.utilization, by_class.sum(axis=1), axes=1
            )

    # Sessions and parked windows still open when the run ends are counted as they stand.
    tally.session_hist += np.bincount(
        length_bins(carry_session[settled]), minlength=len(tally.session_hist)
    )
    tally.sessions += np.count_nonzero(settled)
    tally.parked_hist += np.bincount(
        length_bins(carry_parked[carry_parked > 0]), minlength=len(tally.parked_hist)
    )

    acc.final_kwh = e
    tally.vehicles = float(n)
    tally.vehicle_days = float(n * p.days)
    tally.opted_in_vehicles = float(np.count_nonzero(opted))
    tally.tops_min = float(tops.sum()) * period
    tally.drive_kwh = float(acc.drive_kwh.sum())
    tally.grid_kwh = float(acc.grid_kwh.sum())
    tally.fast_grid_kwh = float(acc.fast_grid_kwh.sum())
    tally.compute_kwh = float(acc.compute_kwh.sum())

    # Earnings: sustained TOPS-hours sold (scaled by utilisation), owner's share, energy cost.
    revenue = sustained_tops_min / 60 / 1000 * econ.utilization * econ.price_usd_per_1k_tops_hour
    payout = revenue * econ.revenue_share
    electricity = acc.compute_kwh / eta * econ.electricity_usd_per_kwh
    tally.revenue_usd = float(revenue.sum())
    tally.payout_usd = float(payout.sum())
    tally.electricity_usd = float(electricity.sum())
    monthly = (payout - electricity)[opted] * (_DAYS_PER_MONTH / p.days)
    idx = np.clip(np.floor(monthly - EARNINGS_EDGES[0]), 0, len(EARNINGS_EDGES) - 2)
    tally.earnings_hist += np.bincount(idx.astype(np.int64), minlength=len(EARNINGS_EDGES) - 1)
    return tally, acc, rec


def _record_trips(
    rec: ChunkRecord, day: int, depart: Arr, arrive: Arr, before: Arr, after: Arr, who: Arr
) -> None:
    for k, v in enumerate(who):
        rec.trips.append(
            (int(v), day, float(depart[k]), float(arrive[k]), float(before[k]), float(after[k]))
        )


def _record_sessions(
    rec: ChunkRecord, day: int, who: Arr, ok: Arr, start: Arr, stop: Arr, e_start: Arr, e_stop: Arr
) -> None:
    for k in np.flatnonzero(ok & (stop > start)):
        rec.sessions.append(
            (int(who[k]), day, float(start[k]), float(stop[k]), float(e_start[k]), float(e_stop[k]))
        )


def _record_windows(
    rec: ChunkRecord,
    day: int,
    who: Arr,
    t0: Arr,
    t1: Arr,
    place: Arr,
    kw: Arr,
    e0: Arr,
    e1: Arr,
) -> None:
    for k in np.flatnonzero(t1 > t0):
        rec.windows.append(
            (
                int(who[k]),
                day,
                float(t0[k]),
                float(t1[k]),
                int(place[k]),
                float(kw[k]),
                float(e0[k]),
                float(e1[k]),
            )
        )

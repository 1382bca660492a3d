"""State of charge through a parked window, in closed form, for whole arrays of cars at once.

Power flows (all in kW, energy in kWh, time in minutes): a plugged-in car draws ``P`` from the
grid through its on-board charger at efficiency ``eta``, so ``eta * P`` reaches the DC bus; the
computer draws ``C`` from that bus and the battery takes the rest. Unplugged, the battery feeds
the computer alone. The charger stops adding energy at the charge limit ``L``; a car at its
limit keeps its charge session open and the charger feeds the computer (``C / eta`` from the
grid), so the battery holds. Hence, per phase, ``battery gain + compute energy = eta * grid
energy`` exactly, which is what the conservation test checks against the model's separate
accounts of grid, driving and compute energy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["charge", "compute"]


def charge(
    e: np.ndarray, minutes: np.ndarray, r_kw: np.ndarray, limit: np.ndarray, p_kw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Charge for ``minutes`` at ``r_kw`` into the battery up to ``limit``: (energy, grid kWh).

    ``r_kw`` is zero for a car that is not plugged in (nothing changes then).
    """
    room = np.maximum(limit - e, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        full_after = np.where(r_kw > 0, room * 60.0 / r_kw, 0.0)
    charging = np.minimum(np.maximum(minutes, 0.0), full_after)
    return e + r_kw * charging / 60.0, p_kw * charging / 60.0


def compute(
    e: np.ndarray,
    span: np.ndarray,
    cap_kwh: np.ndarray,
    floor: np.ndarray,
    c_kw: np.ndarray,
    r_kw: np.ndarray,
    limit: np.ndarray,
    p_kw: np.ndarray,
    eta: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compute from charge ``e`` for up to ``span`` minutes.

    The run stops early when it has used ``cap_kwh`` (the day's remaining energy cap) or when
    the charge falls to ``floor`` (only possible when the charger, if any, is weaker than the
    computer). Returns (minutes run, energy after, grid kWh, compute kWh, stopped by the cap,
    stopped at the floor).
    """
    net = r_kw - c_kw
    with np.errstate(divide="ignore", invalid="ignore"):
        by_cap = np.where(c_kw > 0, cap_kwh * 60.0 / c_kw, np.inf)
        by_floor = np.where(net < 0, (e - floor) * 60.0 / -net, np.inf)
        to_limit = np.where(e >= limit, 0.0, np.where(net > 0, (limit - e) * 60.0 / net, np.inf))
    minutes = np.maximum(np.minimum(np.minimum(span, by_cap), by_floor), 0.0)
    rising = net >= 0
    # While rising: full charger power until the limit, then hold (the charger feeds the load).
    at_full = np.where(rising, np.minimum(minutes, to_limit), minutes)
    e_after = e + net * at_full / 60.0
    grid = np.where(
        rising,
        p_kw * at_full / 60.0 + c_kw / eta * (minutes - at_full) / 60.0,
        p_kw * minutes / 60.0,
    )
    used = c_kw * minutes / 60.0
    return (
        minutes,
        e_after,
        grid,
        used,
        (by_cap <= minutes) & (by_cap < span),
        (by_floor <= minutes) & (by_floor < span),
    )

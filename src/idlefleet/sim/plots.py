"""Draw a fleet run as PNGs: capacity over the week, window lengths, owners' earnings.

``capacity.png`` is the figure the README shows: how much of the fleet's nameplate INT8 compute
is parked, opted in, computing and sustained, through the simulated days in UTC, with the
factors that take one to the next. ``windows.png`` shows how long compute sessions and parked
windows last, ``earnings.png`` what opted-in owners net a month. Compute is INT8 TOPS
throughout and labelled so: it is not comparable with the FP64 FLOPS supercomputers are ranked
by. matplotlib (the ``sim`` extra) is imported only when plotting, with the Agg backend, so the
simulator runs without it and without a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idlefleet.sim.outputs import WEEKDAYS
from idlefleet.sim.run import SimResult
from idlefleet.sim.tally import EARNINGS_EDGES, LENGTH_EDGES

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["MATPLOTLIB_HINT", "check_plotting", "write_plots"]

MATPLOTLIB_HINT = "Plots need matplotlib: pip install 'idlefleet[sim]' (or pass --no-plots)"

_SIZE_IN = (10.0, 5.0)
_DPI = 100
# Larger scales are named by their SI prefix and spelt out in TOPS, because "exaOPS" alone
# invites a comparison with exaFLOPS, which count FP64 operations.
_TOPS_SCALES = (
    (9, "INT8 zettaOPS (10⁹ INT8 TOPS)"),
    (6, "INT8 exaOPS (10⁶ INT8 TOPS)"),
    (3, "INT8 petaOPS (10³ INT8 TOPS)"),
    (0, "INT8 TOPS"),
)
_LENGTH_TICKS = (
    (1, "1 min"),
    (5, "5 min"),
    (15, "15 min"),
    (60, "1 h"),
    (180, "3 h"),
    (360, "6 h"),
    (720, "12 h"),
    (1440, "1 day"),
    (2880, "2 days"),
    (10080, "1 week"),
)
_USD_TICKS = (-20, -10, 0, 10, 20, 50, 100, 200, 500)
_USD_EDGES = (
    *range(-20, 20),
    *(20, 25, 30, 40, 50, 60, 80, 100, 125, 150, 200, 250, 300, 400, 500),
)
_USD_LINEAR_BELOW = 20.0
"""Earnings are linear from -$20 to $20, where most owners are, and logarithmic above, where
the few cars with big computers earn."""


def check_plotting() -> None:
    """Raise ValueError with the install hint if matplotlib is missing (checked before a run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MATPLOTLIB_HINT) from None


def write_plots(result: SimResult, out_dir: Path) -> list[Path]:
    """Write ``capacity.png``, ``windows.png`` and ``earnings.png`` into ``out_dir``."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    written = []
    for name, draw in (
        ("capacity", _capacity),
        ("windows", _windows),
        ("earnings", _earnings),
    ):
        fig = draw(plt, result, summary)
        path = out_dir / f"{name}.png"
        try:
            fig.savefig(path, dpi=_DPI)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def tops_scale(largest: float) -> tuple[float, str]:
    """Divisor and axis label that put ``largest`` INT8 TOPS between 1 and 1,000."""
    for exponent, label in _TOPS_SCALES:
        if largest >= 10.0**exponent:
            return 10.0**exponent, label
    return 1.0, _TOPS_SCALES[-1][1]


def _factor_line(factors: dict[str, float]) -> str:
    return (
        f"availability {factors['availability']:.3f} × opt-in {factors['opt_in']:.3f} × "
        f"charging {factors['charging']:.3f} × thermal {factors['thermal']:.3f} = "
        f"{factors['product']:.4f} of the fleet's peak INT8 TOPS sustained on average"
        "  ·  INT8, not FP64"
    )


def _capacity(plt: Any, result: SimResult, summary: dict[str, Any]) -> Any:
    p, series = result.params, result.timeseries()
    compute = summary["compute"]
    fleet_peak = compute["fleet_peak_int8_tops"]
    scale, unit = tops_scale(fleet_peak)
    # Step plots over the bins: each value is the mean over [start, start + bin), and the
    # period closes at the end of the last day.
    days = np.append(series["minute"], p.days * 1440) / 1440

    def stepped(name: str) -> np.ndarray:
        values = series[name]
        return np.append(values, values[-1])

    from matplotlib.ticker import EngFormatter

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=_SIZE_IN, sharex=True, gridspec_kw={"height_ratios": (3, 1)}
    )
    top.axhline(
        fleet_peak / scale, color="0.35", linestyle="--", linewidth=1, label="whole fleet, peak"
    )
    layers = (
        ("parked_int8_tops_peak", "parked, peak", "#c6dbef"),
        ("opted_in_parked_int8_tops_peak", "parked and opted in, peak", "#6baed6"),
        ("computing_int8_tops_peak", "computing, peak", "#3182bd"),
        ("computing_int8_tops_sustained", "computing, sustained", "#08306b"),
    )
    for name, label, colour in layers:
        top.fill_between(days, stepped(name) / scale, step="post", color=colour, label=label)
    mean_sustained = compute["mean_computing_int8_tops_sustained"] / scale
    top.axhline(
        mean_sustained,
        color="#e6550d",
        linewidth=1.2,
        label=f"mean sustained: {mean_sustained:,.3g}",
    )
    top.set_ylim(0, fleet_peak / scale * 1.08)
    top.set_ylabel(unit)
    top.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    top.grid(axis="y", alpha=0.3)
    top.set_title(_factor_line(summary["factors"]), fontsize=8, color="0.25")
    fig.suptitle(
        f"Compute available from {p.vehicles:,} simulated cars over {p.days} days (UTC), "
        f"seed {p.seed}",
        fontsize=12,
    )

    bottom.fill_between(days, stepped("computing_vehicles"), step="post", color="#2171b5")
    bottom.set_ylim(bottom=0)
    bottom.yaxis.set_major_formatter(EngFormatter(sep=""))  # 120k, not 120000
    bottom.set_ylabel("cars\ncomputing", fontsize=8)
    bottom.grid(axis="y", alpha=0.3)
    _weekday_axis(bottom, p.days, p.start_weekday)
    fig.subplots_adjust(left=0.09, right=0.78, top=0.87, bottom=0.1, hspace=0.08)
    return fig


def _weekday_axis(ax: Axes, days: int, start_weekday: int) -> None:
    step = max(1, math.ceil(days / 14))
    ticks = list(range(0, days + 1, step))
    labels = [WEEKDAYS[(start_weekday + d) % 7] if d < days else "" for d in ticks]
    if days > 7:
        labels = [
            f"{label}\nday {d}" if label else "" for d, label in zip(ticks, labels, strict=True)
        ]
    ax.set_xticks(ticks, labels)
    # Labels sit at midnight UTC; on a week or two, minor ticks mark every six hours.
    if days <= 14:
        ax.set_xticks(np.arange(0, days + 0.01, 0.25), minor=True)
    ax.set_xlim(0, days)
    ax.set_xlabel("day (UTC, ticks at midnight UTC)", fontsize=9)


def _windows(plt: Any, result: SimResult, summary: dict[str, Any]) -> Any:
    tally, windows = result.tally, summary["windows"]
    fig, ax = plt.subplots(figsize=_SIZE_IN)
    # Bin 0 holds lengths under a minute, which a log axis cannot show; they are counted in the
    # shares all the same.
    edges = LENGTH_EDGES[1:]
    curves = (
        (tally.parked_hist, "parked windows", "#9ecae1", windows["parked_window_min_median"]),
        (tally.session_hist, "compute sessions", "#08519c", windows["compute_session_min_median"]),
    )
    for counts, label, colour, median in curves:
        total = counts.sum()
        shares = counts[1:] / total if total else counts[1:]
        # Parked windows filled, sessions as an outline on top, so neither hides the other.
        filled = label == "parked windows"
        ax.stairs(
            shares,
            edges,
            fill=filled,
            linewidth=0 if filled else 2,
            color=colour,
            label=f"{label} ({total:,.0f})",
        )
        if median is not None and math.isfinite(median):
            ax.axvline(median, color=colour, linestyle="--", linewidth=1.5)
            ax.annotate(
                f"median {_duration(median)}",
                xy=(median, 1),
                xycoords=("data", "axes fraction"),
                xytext=(4, -14 if label == "parked windows" else -28),
                textcoords="offset points",
                color="#08306b" if label == "compute sessions" else "0.3",
                fontsize=9,
            )
    ax.set_xscale("log")
    ax.set_xticks([t for t, _ in _LENGTH_TICKS], [label for _, label in _LENGTH_TICKS])
    ax.minorticks_off()
    ax.set_xlim(1, LENGTH_EDGES[-1])
    ax.set_xlabel("length (log scale)")
    ax.set_ylabel("share of each kind per bin")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", frameon=False)
    p = result.params
    ax.set_title(
        f"How long cars stay parked, and how long they compute ({p.vehicles:,} cars, "
        f"{p.days} days, seed {p.seed}; {windows['compute_sessions_per_opted_in_vehicle_day']:.2f} "
        "sessions per opted-in car-day)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _duration(minutes: float) -> str:
    if minutes < 60:
        return f"{minutes:.0f} min"
    if minutes < 2880:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 1440:.1f} days"


def _earnings_bins(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The $1 histogram regrouped: $1 bins up to $20, then bins a constant ~25% wide, so the
    few owners spread thinly over $20-500 show up as bars rather than as dust."""
    edges = np.array(_USD_EDGES, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    at = np.searchsorted(EARNINGS_EDGES, edges)
    return np.diff(cumulative[at]), edges


def _usd(value: float, spec: str = ",.2f") -> str:
    """Dollars for a figure label (whole dollars bare). The "$" is escaped because a pair of
    them would start matplotlib's mathtext."""
    size = abs(value)
    shown = f"{size:,.0f}" if float(size).is_integer() else f"{size:{spec}}"
    return ("-" if value < 0 else "") + "\\$" + shown


def _earnings(plt: Any, result: SimResult, summary: dict[str, Any]) -> Any:
    money, economics, p = summary["earnings"], result.params.economics, result.params
    counts, edges = _earnings_bins(result.tally.earnings_hist)
    fig, ax = plt.subplots(figsize=_SIZE_IN)
    ax.stairs(counts, edges, fill=True, color="#31a354", alpha=0.8)
    ax.set_xscale("symlog", linthresh=_USD_LINEAR_BELOW, linscale=1.5)
    ax.set_xticks(list(_USD_TICKS), [_usd(t) for t in _USD_TICKS])
    ax.minorticks_off()
    ax.set_xlim(edges[0], edges[-1])
    ax.axvline(0, color="0.3", linewidth=0.8)
    marks = (
        ("mean", money["owner_net_per_opted_in_vehicle_month"], "#e6550d"),
        ("median", money["owner_net_month_median"], "#08519c"),
    )
    for n, (name, value, colour) in enumerate(marks):
        if value is None or not math.isfinite(value):
            continue
        ax.axvline(value, color=colour, linestyle="--", linewidth=1.5)
        ax.annotate(
            f"{name} {_usd(value)}",
            xy=(value, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -14 - 14 * n),
            textcoords="offset points",
            color=colour,
            fontsize=9,
        )
    assumptions = "\n".join(
        (
            f"price {_usd(economics.price_usd_per_1k_tops_hour, 'g')} per 1k INT8 TOPS-hour "
            "(sustained)",
            f"owner's revenue share {economics.revenue_share:.0%}",
            f"electricity {_usd(economics.electricity_usd_per_kwh, 'g')}/kWh",
            f"utilisation {economics.utilization:.0%} of allowed compute time",
            f"mean payout {_usd(money['owner_payout_per_opted_in_vehicle_month'])} "
            f"− electricity {_usd(money['owner_electricity_per_opted_in_vehicle_month'])}",
        )
    )
    ax.text(
        0.01,
        0.97,
        assumptions,
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8"},
    )
    ax.set_xlabel(
        "net earnings per month, USD (linear to \\$20, log above; below -\\$20 and above "
        "\\$500 counted in the end bins)",
        fontsize=9,
    )
    ax.set_ylabel("opted-in owners per bin")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(
        f"What opted-in owners net a month: payout − electricity "
        f"({result.tally.opted_in_vehicles:,.0f} of {p.vehicles:,} cars, {p.days} days, "
        f"seed {p.seed})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig

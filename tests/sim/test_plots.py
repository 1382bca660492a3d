"""The plots are real, small PNGs that say what they show: INT8 TOPS, fleet, days, seed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from idlefleet.sim.params import SimParams
from idlefleet.sim.plots import tops_scale, write_plots
from idlefleet.sim.run import SimResult, simulate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result() -> SimResult:
    return simulate(SimParams.build(vehicles=2000, days=2, chunk_vehicles=1000), workers=1)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Every figure saved, by file stem, so a test can read its titles and labels."""
    figures: dict[str, Figure] = {}
    save = Figure.savefig

    def recording(fig: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        figures[Path(fname).stem] = fig
        save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def texts(fig: Figure) -> str:
    found = fig.findobj(Text)
    return "\n".join(text.get_text() for text in found if isinstance(text, Text))


def test_writes_three_small_valid_pngs(result: SimResult, tmp_path: Path) -> None:
    # Act
    written = write_plots(result, tmp_path / "plots")

    # Assert
    assert [path.name for path in written] == ["capacity.png", "windows.png", "earnings.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size < 200_000
        with Image.open(path) as image:
            assert image.size == (1000, 500)
            assert len(image.getcolors(maxcolors=1_000_000) or []) > 10  # not a blank canvas


def test_capacity_plot_names_fleet_days_seed_and_int8(
    result: SimResult, tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    # Act
    write_plots(result, tmp_path)

    # Assert
    text = texts(drawn["capacity"])
    assert "2,000 simulated cars over 2 days (UTC), seed 0" in text
    assert "INT8, not FP64" in text
    assert "INT8 exaOPS (10⁶ INT8 TOPS)" in text  # ~1.6×10⁶ TOPS for 2,000 cars
    factors = result.factors()
    assert f"availability {factors['availability']:.3f} × opt-in {factors['opt_in']:.3f}" in text
    assert [label.get_text() for label in drawn["capacity"].axes[1].get_xticklabels()] == [
        "Mon",
        "Tue",
        "",
    ]


def test_windows_and_earnings_plots_mark_their_medians(
    result: SimResult, tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    # Arrange
    summary = result.summary()

    # Act
    write_plots(result, tmp_path)

    # Assert
    session_h = summary["windows"]["compute_session_min_median"] / 60
    assert f"median {session_h:.1f} h" in texts(drawn["windows"])
    earnings = texts(drawn["earnings"])
    assert f"median \\${summary['earnings']['owner_net_month_median']:,.2f}" in earnings
    assert "per 1k INT8 TOPS-hour" in earnings
    assert "owner's revenue share 70%" in earnings


def test_a_longer_run_labels_its_days(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    # Arrange
    nine_days = simulate(SimParams.build(vehicles=200, days=9), workers=1)

    # Act
    write_plots(nine_days, tmp_path)

    # Assert
    labels = [label.get_text() for label in drawn["capacity"].axes[1].get_xticklabels()]
    assert labels[0] == "Mon\nday 0"
    assert labels[7] == "Mon\nday 7"


@pytest.mark.parametrize(
    ("largest", "divisor", "label"),
    [
        (7.8e8, 1e6, "INT8 exaOPS (10⁶ INT8 TOPS)"),
        (1.6e6, 1e6, "INT8 exaOPS (10⁶ INT8 TOPS)"),
        (4e5, 1e3, "INT8 petaOPS (10³ INT8 TOPS)"),
        (500.0, 1.0, "INT8 TOPS"),
        (0.0, 1.0, "INT8 TOPS"),
        (5e11, 1e9, "INT8 zettaOPS (10⁹ INT8 TOPS)"),
    ],
)
def test_tops_scale_keeps_the_axis_between_1_and_1000(
    largest: float, divisor: float, label: str
) -> None:
    # Act / Assert
    assert tops_scale(largest) == (divisor, label)


def test_without_matplotlib_the_error_says_how_to_get_it(
    result: SimResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a None entry makes ``import matplotlib`` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    # Act / Assert
    with pytest.raises(ValueError, match=r"pip install 'idlefleet\[sim\]'"):
        write_plots(result, tmp_path)
    assert list(tmp_path.iterdir()) == []

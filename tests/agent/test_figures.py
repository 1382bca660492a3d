"""The car's figures between heartbeats (``agent/figures.py``)."""

from __future__ import annotations

from idlefleet.agent.figures import MAX_STOPS, Figures


def test_nothing_happened_nothing_to_send() -> None:
    assert Figures().take() is None


def test_take_sums_since_the_last_take_and_starts_again() -> None:
    f = Figures()
    f.ran(1.0, 100.0)
    f.ran(0.5, 50.0, stop_s=0.006)
    f.preempted()

    taken = f.take()

    assert taken is not None
    assert (taken.runs, taken.compute_s, taken.energy_j, taken.preemptions) == (2, 1.5, 150.0, 1)
    assert taken.stop_s == [0.006]
    assert f.take() is None


def test_figures_put_back_go_with_the_next_heartbeat() -> None:
    f = Figures()
    f.ran(1.0, 10.0, stop_s=0.01)
    lost = f.take()
    assert lost is not None
    f.ran(2.0, 20.0, stop_s=0.02)

    f.put_back(lost)
    taken = f.take()

    assert taken is not None
    assert (taken.runs, taken.compute_s, taken.energy_j) == (2, 3.0, 30.0)
    assert taken.stop_s == [0.01, 0.02]  # oldest first


def test_only_the_latest_stop_times_are_kept() -> None:
    f = Figures()
    for i in range(MAX_STOPS + 5):
        f.ran(0.1, 1.0, stop_s=float(i))
    taken = f.take()
    assert taken is not None and taken.runs == MAX_STOPS + 5
    assert taken.stop_s == [float(i) for i in range(5, MAX_STOPS + 5)]

"""Hypothesis settings of the fuzz tests: few examples and the same ones every run in CI, many
random ones when ``scripts/fuzz.py`` sets ``IDLEFLEET_FUZZ_EXAMPLES`` (and a seed per round).

No example database is written: the checkout is shared, and a CI run is derandomised anyway;
a failure prints the blob that replays it (``@reproduce_failure``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["LONG_RUN", "fuzz_settings"]

LONG_RUN = "IDLEFLEET_FUZZ_EXAMPLES" in os.environ
"""Run by ``scripts/fuzz.py``: many examples, random (the seed comes from pytest's
``--hypothesis-seed``)."""


def fuzz_settings(examples: int, **overrides: object) -> settings:
    """``examples`` in CI (derandomised); ``IDLEFLEET_FUZZ_EXAMPLES`` each in a long run."""
    count = int(os.environ["IDLEFLEET_FUZZ_EXAMPLES"]) if LONG_RUN else examples
    options: dict[str, object] = {
        "max_examples": count,
        "derandomize": not LONG_RUN,
        "database": None,
        "deadline": None,
        "print_blob": True,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    }
    options.update(overrides)
    return settings(**options)  # type: ignore[arg-type]

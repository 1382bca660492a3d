"""A signed release of MiniLM holds only `model_files`: a car with an empty cache must be able
to build and run the model from exactly those files (the fleet's package is not on a car)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idlefleet.agent.runtime import Embedder
from idlefleet.models.catalog import MINILM
from idlefleet.workloads import for_model


def test_a_release_folder_alone_builds_a_model_that_embeds_like_the_package(
    tmp_path: Path,
) -> None:
    workload = for_model(MINILM.id)
    assert workload is not None
    release = tmp_path / "release"
    release.mkdir()
    for name, path in workload.model_files(MINILM.id).items():
        os.symlink(path, release / name)  # as agent.releases lays a verified release out

    from_release = Embedder.load(tmp_path / "car-cache", model_dir=release)
    from_package = Embedder.load(tmp_path / "other-cache")

    texts = ["a parked car", "runs a model"]
    assert sorted(p.name for p in release.iterdir()) == sorted(workload.model_files(MINILM.id))
    np.testing.assert_array_equal(
        from_release.embed(texts).vectors, from_package.embed(texts).vectors
    )

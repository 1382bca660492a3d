"""Signed model releases on the car: fetch, verify, and lay out the files a runner builds from.

An agent started with the operator's public key(s) (``--trusted-key``) runs only models it
fetched from the fleet's models object store and verified (`idlefleet.models.distribution`:
the manifest's signature, expiry and version, every byte's sha256) — never the weights its own
packages hold. A verified release is laid out as ``<cache>/releases/sources/<digest>/<name>``
(links to the content-addressed files), which a workload's ``runner(..., source=...)`` reads.

The fetcher keeps finished parts, so an interrupted download resumes, and a release whose files
are all present moves no bytes. A work grant names the release it is for; a car holding another
one gives the unit back, stops asking for that model, and fetches the named release when its
car is charging. At start an agent fetches the current release of each model it serves (it
cannot work without one).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.js import JetStreamContext

from idlefleet.models.distribution import ModelFetcher

__all__ = ["CarReleases"]

log = logging.getLogger(__name__)


@dataclass
class CarReleases:
    cache_dir: Path
    trusted: Mapping[str, Ed25519PublicKey]
    held: dict[str, str] = field(default_factory=dict)
    """The release (manifest digest) of each model this car runs now."""
    bytes_downloaded: int = 0
    refused: int = 0
    """Releases refused since the agent started (a failed transfer is not a refusal); its
    heartbeats report it."""

    def refuse(self, model: str, exc: Exception) -> None:
        self.refused += 1
        log.error("model %s: release refused (%s): %s", model, type(exc).__name__, exc)

    @property
    def root(self) -> Path:
        return self.cache_dir / "releases"

    async def fetch(
        self, js: JetStreamContext, model: str, digest: str | None = None
    ) -> tuple[str, Path]:
        """Fetch and verify ``model``'s release ``digest`` (None: the current one); its digest
        and the folder of its files by name. Raises the fetcher's errors: nothing unverified
        is laid out. The caller records it in ``held`` once a runner is built from it."""
        fetcher = ModelFetcher(js, self.root, self.trusted)
        if digest is None:
            fetched = await fetcher.fetch_latest(model)
        else:
            fetched = await fetcher.fetch(digest, model=model)
        self.bytes_downloaded += fetched.bytes_downloaded
        log.info(
            "model %s: release %s (version %d), %d bytes downloaded",
            model,
            fetched.digest[:12],
            fetched.manifest.version,
            fetched.bytes_downloaded,
        )
        return fetched.digest, self._lay_out(fetched.digest, fetched.files)

    def _lay_out(self, digest: str, files: Mapping[str, Path]) -> Path:
        source = self.root / "sources" / digest
        if source.is_dir() and all((source / name).exists() for name in files):
            return source
        source.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=source.parent, prefix=f".{digest[:12]}."))
        for name, path in files.items():
            os.symlink(path.resolve(), staging / name)
        try:
            os.rename(staging, source)
        except OSError:  # another agent sharing this cache laid it out first
            shutil.rmtree(staging, ignore_errors=True)
        return source

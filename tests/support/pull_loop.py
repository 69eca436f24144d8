"""One client pulling an image (its manifest, then every layer) in a loop on a thread, on
one keep-alive session: what a CI farm's pulls see while the agent swaps registry
generations under them (a collection's read-only window). Used by the gc tests, which
require no failure, and by ``bench.gc_collect``, which reports each pull's latency.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from tests.support.lifecycle import StartStop

MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"
# The one retry comes 50 ms later, as in test_rotation_load: 2.x's handover window is a few
# ms on a quiet machine, but an immediate retry on this busy 2-core machine was refused
# again (seen: 2 of ~10 pulls).
RETRY_DELAY = 0.05


class PullLoop(StartStop):
    """Pulls ``ref`` (``repo:tag``) from ``base`` (``https://host:port``) until left.

    A refused connect is retried once (2.x refuses for milliseconds while generations
    switch), counted in :attr:`retries`. With ``retry_unanswered``, so is a request on a
    kept-alive connection that the draining generation closed with no response byte (what
    Go's and docker's clients retry by themselves for a GET), counted in :attr:`unanswered`.
    Anything else is a failure. :attr:`samples` holds (start, seconds) per whole pull.
    """

    def __init__(
        self, session: requests.Session, base: str, ref: str, *, retry_unanswered: bool = False
    ) -> None:
        repo, tag = ref.rsplit(":", 1)
        self.session = session
        self.manifest_url = f"{base}/v2/{repo}/manifests/{tag}"
        self.repo_url = f"{base}/v2/{repo}"
        self.retry_unanswered = retry_unanswered
        self.samples: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self.retries = 0
        self.unanswered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def pulls(self) -> int:
        return len(self.samples)

    def between(self, start: float, end: float) -> list[float]:
        """The durations of the pulls that began in [start, end) (monotonic clock)."""
        return [seconds for began, seconds in self.samples if start <= began < end]

    def start(self) -> PullLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _get(self, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.get(url, timeout=30, **kwargs)
        except requests.ConnectionError as error:
            text = str(error)
            if "refused" in text.lower():
                self.retries += 1
            elif self.retry_unanswered and (
                "RemoteDisconnected" in text or "without response" in text
            ):
                self.unanswered += 1
            else:
                raise
            time.sleep(RETRY_DELAY)
            return self.session.get(url, timeout=30, **kwargs)

    def _pull(self) -> str | None:
        """One pull; what went wrong, or None."""
        manifest = self._get(self.manifest_url, headers={"Accept": MANIFEST_ACCEPT})
        if manifest.status_code != 200:
            return f"manifest: HTTP {manifest.status_code}"
        for layer in manifest.json()["layers"]:
            blob = self._get(f"{self.repo_url}/blobs/{layer['digest']}")
            if blob.status_code != 200 or len(blob.content) != layer["size"]:
                return f"blob: HTTP {blob.status_code}, {len(blob.content)} bytes"
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                failure = self._pull()
            except requests.RequestException as error:
                failure = repr(error)[:200]
            if failure is None:
                self.samples.append((began, time.monotonic() - began))
            else:
                self.failures.append(failure)

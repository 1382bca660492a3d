"""Reads the car from an Eclipse KUKSA databroker (optional extra ``idlefleet[kuksa]``).

`KuksaSource` subscribes to every VSS path in `SIGNALS` through the ``kuksa-client`` package
(its synchronous ``VSSClient``, which uses the databroker's ``kuksa.val.v2.VAL/Subscribe`` and
falls back to ``kuksa.val.v1`` on older brokers), feeds each update into a `StateAssembler`
and pushes the resulting `StateReading` to the listener from its own daemon thread. The
broker's first message is the current value of every signal, so the first reading is a full
state; signals the broker has no value for become None, and values of the wrong type or range
are passed through unchanged so that the assembler reports them. A refused connection or a
broken stream is delivered as a "lost" reading, and the thread reconnects with a growing
backoff until `stop`, which closes the gRPC channel to end the stream at once. ``kuksa-client``
is imported only when a source is built, so this module imports without the extra installed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from idlefleet.agent.sources.base import StateListener, StateSource
from idlefleet.agent.vehicle_state import SIGNALS, StateAssembler, StateReading

__all__ = ["MISSING_EXTRA", "KuksaSource"]

log = logging.getLogger(__name__)

MISSING_EXTRA = (
    "the KUKSA state source needs the kuksa-client package; "
    "install it with: pip install 'idlefleet[kuksa]'"
)


def _load_client() -> tuple[Any, type[Exception]]:
    """``(VSSClient, VSSClientError)`` from kuksa-client, or ImportError naming the extra."""
    try:
        from kuksa_client.grpc import VSSClient, VSSClientError
    except ImportError as exc:
        raise ImportError(f"{MISSING_EXTRA} ({exc})") from exc
    return VSSClient, VSSClientError


class KuksaSource(StateSource):
    """Vehicle state from a KUKSA databroker subscription, pushed from a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 55555,
        *,
        token: str | None = None,
        root_certificates: str | Path | None = None,
        tls_server_name: str | None = None,
        connect_timeout: float = 5.0,
        min_backoff: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        """Connect to ``host:port``; TLS when ``root_certificates`` (a CA PEM file) is given.

        ``token`` is a databroker JWT sent as a bearer token. Raises ImportError (mentioning
        ``idlefleet[kuksa]``) when kuksa-client is not installed.
        """
        self._client_cls, self._client_error = _load_client()
        self.host = host
        self.port = port
        self._token = token
        self._root_certificates = Path(root_certificates) if root_certificates else None
        self._tls_server_name = tls_server_name
        self._connect_timeout = connect_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._assembler = StateAssembler()
        self._stopping = threading.Event()
        self._client_lock = threading.Lock()
        self._client: Any = None  # the connected VSSClient, owned by whoever takes it out
        self._emit_lock = threading.RLock()  # stop() waits on it for a delivery in progress
        self._listener: StateListener | None = None
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, listener: StateListener) -> None:
        if self._thread is not None:
            raise RuntimeError("KuksaSource.start called twice")
        self._listener = listener
        self._thread = threading.Thread(
            target=self._run, name=f"kuksa-source {self.target}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._close(self._take_client())  # cancels a stream or connect in progress
        with self._emit_lock:
            pass  # a delivery that had begun before stop() has now finished
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
            if thread.is_alive():
                log.warning("kuksa source thread for %s did not end within 2 s", self.target)

    # -- the source's thread -------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stopping.is_set():
            try:
                if self._subscribe_once():
                    backoff = self._min_backoff  # the stream worked: retry quickly
                why = "the broker ended the subscription"
            except self._client_error as exc:
                why = _describe_client_error(exc)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            finally:
                self._close(self._take_client())
            if self._stopping.is_set():
                break
            # Warn once per outage; the retries of a long one are only debug noise.
            log.log(
                logging.WARNING if backoff == self._min_backoff else logging.DEBUG,
                "kuksa databroker %s: %s; retrying in %.1f s",
                self.target,
                why,
                backoff,
            )
            self._emit(
                self._assembler.lost(f"kuksa databroker at {self.target}: {why}", self.now())
            )
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, self._max_backoff)

    def _subscribe_once(self) -> bool:
        """Connect, then deliver a reading per broker message until the stream ends.

        Returns whether any message arrived; raises on a refused or broken connection.
        """
        client = self._client_cls(
            self.host,
            self.port,
            token=self._token,
            root_certificates=self._root_certificates,
            tls_server_name=self._tls_server_name,
            ensure_startup_connection=False,
        )
        client.connect()  # only creates the channel; nothing is sent yet
        with self._client_lock:
            if self._stopping.is_set():
                self._close(client)
                return False
            self._client = client
        try:  # fails within connect_timeout when the broker is unreachable
            client.get_server_info(timeout=self._connect_timeout)
        except self._client_error as exc:
            if _status_code(exc) != "unimplemented":
                raise  # (a broker without the v1 API: let the v2 subscription decide)
        received = False
        for updates in client.subscribe_current_values(list(SIGNALS)):
            received = True
            values = {path: getattr(dp, "value", None) for path, dp in updates.items()}
            self._emit(self._assembler.apply(values, self.now()))
        return received

    def _emit(self, reading: StateReading) -> None:
        with self._emit_lock:
            if self._stopping.is_set() or self._listener is None:
                return
            try:
                self._listener(reading)
            except Exception:
                log.exception("state listener raised on a kuksa reading")

    def _take_client(self) -> Any:
        with self._client_lock:
            client, self._client = self._client, None
        return client

    @staticmethod
    def _close(client: Any) -> None:
        if client is None:
            return
        try:
            client.disconnect()
        except Exception:
            log.debug("closing the kuksa client failed", exc_info=True)


def _status_code(exc: Any) -> str:
    """The gRPC status of a ``VSSClientError`` as a lower-case word ("unavailable")."""
    error = getattr(exc, "error", None)
    return str(error.get("reason", "")).lower() if isinstance(error, dict) else ""


def _describe_client_error(exc: Any) -> str:
    """``VSSClientError.error`` is ``{"code", "reason", "message"}`` from the gRPC status."""
    error = getattr(exc, "error", None)
    if isinstance(error, dict) and (error.get("reason") or error.get("message")):
        parts = [str(error[k]) for k in ("reason", "message") if error.get(k)]
        return ": ".join(parts)
    return f"{type(exc).__name__}: {exc}"

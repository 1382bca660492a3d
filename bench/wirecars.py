"""A lean NATS request/reply client for load generation: many simulated cars on one connection.

The dispatch bench must load one coordinator process on a 2-core machine that also runs the load
generator and nats-server. nats-py spends ~70-95 µs of CPU per request/reply, as much as the
coordinator spends answering it, so the generator itself capped what could be measured. This
speaks the NATS text protocol (CONNECT, SUB, PUB, MSG, PING/PONG) straight to the real
nats-server, with one wildcard inbox per connection and requests told apart by the last token of
their reply subject. It is a load generator, not product code: no reconnects, no headers, no TLS.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os

__all__ = ["WireConnection"]


class WireConnection(asyncio.Protocol):
    """One TCP connection to nats-server carrying requests for many cars."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._tokens = itertools.count()
        self._inbox = f"_WIRE.{os.urandom(6).hex()}".encode()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._out: list[bytes] = []
        self._flush_scheduled = False

    @classmethod
    async def connect(cls, url: str) -> WireConnection:
        host, _, port = url.removeprefix("nats://").rpartition(":")
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, int(port))
        await asyncio.wait_for(protocol._ready, 10)
        return protocol

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        connect = {"verbose": False, "pedantic": False, "headers": False, "protocol": 1}
        transport.write(
            b"CONNECT " + json.dumps(connect).encode() + b"\r\n"
            b"SUB " + self._inbox + b".* 1\r\nPING\r\n"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"nats connection lost: {exc}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(buffer[:end])
            if line.startswith(b"MSG "):
                parts = line.split(b" ")
                size = int(parts[-1])
                if len(buffer) < end + 2 + size + 2:
                    return  # the payload has not all arrived
                payload = bytes(buffer[end + 2 : end + 2 + size])
                del buffer[: end + 2 + size + 2]
                token = parts[1].rpartition(b".")[2]
                future = self._pending.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(payload)
                continue
            del buffer[: end + 2]
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line == b"PONG" and not self._ready.done():
                self._ready.set_result(None)
            elif line.startswith(b"-ERR"):
                raise ConnectionError(line.decode(errors="replace"))

    # -- requests ------------------------------------------------------------------------------
    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        token = str(next(self._tokens)).encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        self._send(
            b"PUB %s %s.%s %d\r\n%s\r\n"
            % (subject.encode(), self._inbox, token, len(payload), payload)
        )
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(token, None)

    def _send(self, data: bytes) -> None:
        # Everything written in one turn of the event loop goes out in one write.
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._out:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

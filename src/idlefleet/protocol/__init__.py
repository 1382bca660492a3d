"""The wire contract between vehicle agents and the coordinator.

Every message that crosses NATS is one typed definition in :mod:`idlefleet.protocol.messages`,
encoded and validated in :mod:`idlefleet.protocol.codec`, on a subject named in
:mod:`idlefleet.protocol.subjects`. Nothing here opens a socket.
"""

"""The embedded default: nats-server, coordinator and agents as processes on one machine."""

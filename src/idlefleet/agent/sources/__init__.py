"""Vehicle-state sources: a replayed trace, or a KUKSA databroker (optional extra)."""

"""idlefleet: parked electric vehicles as an AI inference cloud."""

__version__ = "0.1.0"

__all__ = ["__version__"]

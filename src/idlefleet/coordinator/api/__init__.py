"""The coordinator's HTTP edge: the OpenAI-compatible ``/v1`` API and the fleet API."""

from idlefleet.coordinator.api.app import create_app

__all__ = ["create_app"]

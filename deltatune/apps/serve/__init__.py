"""Serving many adapters over one shared base model (`deltatune serve`)."""

from deltatune.apps.serve.app import ServeSettings, build_engine, create_app
from deltatune.apps.serve.batching import Engine

__all__ = ["Engine", "ServeSettings", "build_engine", "create_app"]

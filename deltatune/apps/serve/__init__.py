"""Serving many adapters over one shared base model (`deltatune serve`): see docs/serving.md."""

from deltatune.apps.serve.app import build_engine, create_app, server_config
from deltatune.apps.serve.batching import Engine, Scheduler
from deltatune.apps.serve.generation import SamplingParams
from deltatune.apps.serve.server import ServeSettings

__all__ = [
    "Engine",
    "SamplingParams",
    "Scheduler",
    "ServeSettings",
    "build_engine",
    "create_app",
    "server_config",
]

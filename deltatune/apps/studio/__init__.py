"""`deltatune studio`: fine-tune, watch, compare and try adapters from a web page (FastAPI + a static page)."""

from deltatune.apps.studio.app import StudioSettings, create_app, serve

__all__ = ["StudioSettings", "create_app", "serve"]

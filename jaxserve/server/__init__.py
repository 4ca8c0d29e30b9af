"""OpenAI-compatible HTTP serving (FastAPI + uvicorn): routes, the engine thread, metrics."""
from jaxserve.server.app import create_app

__all__ = ["create_app"]

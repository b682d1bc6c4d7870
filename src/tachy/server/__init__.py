"""tachy's OpenAI-compatible server: ``tachy serve`` (cli.py), the app (app.py), one worker (scheduler.py).

``create_app`` is imported on first use: the CLI registers ``tachy serve`` without loading FastAPI, which
would add a quarter of a second to every other command's start.
"""
from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module 'tachy.server' has no attribute {name!r}")

"""tachy's OpenAI-compatible server: ``tachy serve`` (cli.py), the app (app.py), one worker (scheduler.py)."""
from .app import create_app

__all__ = ["create_app"]

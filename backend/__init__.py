"""pluto's backend: the Pluto-compatible HTTP API, its SQLite store and a small dashboard.

>>> from pluto_server import create_app, serve   # `python -m pluto_server` / `pluto server` call serve()
"""

from ._app import create_app
from ._serve import main, serve
from ._settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "main", "serve"]

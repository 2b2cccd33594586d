"""``python -m pluto_server``: serve the API on the host:port of ``PLUTO_API_URL``."""

import sys

from ._serve import main, serve

__all__ = ["main", "serve"]

if __name__ == "__main__":
    sys.exit(main())

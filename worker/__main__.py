"""``python -m pluto_worker``: run one worker until SIGTERM."""

import sys

from ._main import main

sys.exit(main())

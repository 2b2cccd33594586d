"""The backend API tests, run again against a backend process on PostgreSQL: the ``backend``
fixture of tests/storage/conftest.py replaces the SQLite one for every test imported here."""

from __future__ import annotations

from tests.backend.test_columns import *  # noqa: F403
from tests.backend.test_compat import *  # noqa: F403  (logs, data and files too)
from tests.backend.test_ingest import *  # noqa: F403
from tests.backend.test_ledger import test_ledger_through_the_real_backend  # noqa: F401
from tests.backend.test_read import *  # noqa: F403
from tests.backend.test_runs import *  # noqa: F403

del test_body_over_the_limit_is_413  # noqa: F821  (the body limit is not the store's; SQLite only)

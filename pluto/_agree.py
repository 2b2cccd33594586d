"""Every rank of a job on rank 0's run id, so a job never splits into several runs.

The documented multi-node recipe exports ``PLUTO_RUN_ID="training-$(date +%s)"`` on each node;
nodes that start in different seconds disagree. When ``torch.distributed`` is initialised,
rank 0 writes its id into the process group's key-value store and every other rank reads it
there (a bounded wait on one key: not a collective, so ranks that never call ``init`` block
nobody). Rank 0's id wins; a rank whose own id differed warns, naming both. Without a process
group the launcher's job id (``TORCHELASTIC_RUN_ID``, ``SLURM_JOB_ID``) is shared by
construction; failing all that, a fresh id (the process is alone).

torch is never imported here: only a ``torch.distributed`` the user already imported is used.
"""

from __future__ import annotations

import datetime
import re
import sys
import threading
import uuid
import warnings
from collections import Counter
from typing import Any

from ._settings import Settings
from ._values import PlutoWarning, user_stacklevel
from .errors import InitTimeout

KEY = "pluto/run_id/{project}/{n}"
"""Store key of a process's n-th ``init`` of a project (the same n on every rank)."""

_calls: Counter[str] = Counter()
_lock = threading.Lock()
_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")


def agree_run_id(given: str | None, project: str, s: Settings) -> str:
    """The run id this process must use; ``given`` is ``run_id=`` or ``PLUTO_RUN_ID`` (checked)."""
    mine = given or _usable(s.job_run_id)
    dist, store = _process_group_store(s)
    if store is None:
        return mine or uuid.uuid4().hex
    with _lock:
        n = _calls[project]
        _calls[project] += 1
    key = KEY.format(project=project, n=n)
    if dist.get_rank() == 0:
        chosen = mine or uuid.uuid4().hex
        store.set(key, chosen)
        return chosen
    try:
        store.wait([key], datetime.timedelta(seconds=s.init_timeout))
        chosen = store.get(key).decode("utf-8", "replace")
    except Exception as exc:  # noqa: BLE001 - torch raises DistStoreError/RuntimeError variants
        if mine:
            warnings.warn(f"pluto: rank 0 published no run id within PLUTO_INIT_TIMEOUT="
                          f"{s.init_timeout:g} s ({exc}); this rank uses its own {mine!r}, so it "
                          "may log into a run of its own: call pluto.init on rank 0 too",
                          PlutoWarning, stacklevel=user_stacklevel())
            return mine
        raise InitTimeout(f"rank 0 published no run id within PLUTO_INIT_TIMEOUT="
                          f"{s.init_timeout:g} s ({exc}): call pluto.init on rank 0 as well, or "
                          "give every rank the same PLUTO_RUN_ID") from None
    if mine is not None and mine != chosen:
        warnings.warn(f"pluto: this rank's run id {mine!r} differs from rank 0's {chosen!r}; "
                      "using rank 0's so the job stays one run (export the same PLUTO_RUN_ID "
                      "on every node, or leave it unset under torch.distributed)",
                      PlutoWarning, stacklevel=user_stacklevel())
    return chosen


def _process_group_store(s: Settings) -> tuple[Any, Any]:
    """``(torch.distributed, store)`` of the user's default process group, or ``(None, None)``."""
    if s.mode == "disabled":
        return None, None
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None, None
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return None, None
        return dist, dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private API that may move: fall back to the job id
        return None, None


def _usable(job_id: str | None) -> str | None:
    """A launcher's job id if it is a valid run id (1-512 chars, no control characters)."""
    if job_id and len(job_id) <= 512 and not _BAD_ID.search(job_id):
        return job_id
    return None

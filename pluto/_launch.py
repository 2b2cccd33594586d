"""Where this process sits in the job, read from whichever launcher started it.

torchrun sets ``RANK``/``LOCAL_RANK``/``GROUP_RANK`` (the node) and ``TORCHELASTIC_RESTART_COUNT``;
SLURM's ``srun`` sets ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NODEID``; Open MPI's ``mpirun``
``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_LOCAL_RANK``; MPICH/Intel MPI ``PMI_RANK``. The first
launcher found wins, in that order (torchrun inside an ``srun`` step is the common nesting, and its
``RANK`` is the one the training code sees). Without any of them, ``torch.distributed`` if the user
already initialised it. Only ``Settings.from_env`` calls this: nothing else in ``pluto`` reads the
environment.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

MAX_RANK = 2**31 - 1
"""Ranks travel as 64-bit ints (msgpack, the backend); no launcher goes near this."""

RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
NODE_VARS = ("GROUP_RANK", "SLURM_NODEID")
ATTEMPT_VARS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer (set by your launcher; unset it "
                              "or fix the launch command)") from None
        if not 0 <= value <= MAX_RANK:
            raise ConfigError(f"{name}={value} is not a process rank (0 to {MAX_RANK}); unset it "
                              "or fix the launch command")
        return value
    return None


def torch_rank() -> int | None:
    """The rank from torch.distributed if the user already initialised it (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # noqa: BLE001, S110 - a half-initialised process group must not break init
        pass
    return None


def job_run_id(env: Mapping[str, str]) -> str | None:
    """A run id every process of this job shares without talking: the launcher's job id.

    ``TORCHELASTIC_RUN_ID`` (torchrun's ``--rdzv-id``; a fresh uuid under ``--standalone``; the
    literal ``none`` when not given), else ``SLURM_JOB_ID`` plus ``.SLURM_STEP_ID``.
    """
    elastic = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if elastic and elastic.lower() != "none":
        return elastic
    job = env.get("SLURM_JOB_ID", "").strip()
    if job:
        step = env.get("SLURM_STEP_ID", "").strip()
        return f"{job}.{step}" if step else job
    return None


def launch_fields(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``Settings`` fields this module owns: rank, local_rank, node, attempt, job_run_id."""
    rank = _first_int(env, RANK_VARS)
    return {
        "rank": rank if rank is not None else (torch_rank() or 0),
        "local_rank": _first_int(env, LOCAL_RANK_VARS) or 0,
        "node": _first_int(env, NODE_VARS) or 0,
        "attempt": _first_int(env, ATTEMPT_VARS) or 0,
        "job_run_id": job_run_id(env),
    }


_inits = itertools.count(1)
_inits_lock = threading.Lock()
_inits_pid = os.getpid()


def member_name() -> str:
    """``<host>:<pid>`` for this process's first ``init``, ``<host>:<pid>/<n>`` for the n-th:
    two runs (or two handles on one run) in one process are two members, each with its own
    state and heartbeat. A forked child counts afresh (its pid is new)."""
    global _inits, _inits_pid
    with _inits_lock:
        if os.getpid() != _inits_pid:
            _inits, _inits_pid = itertools.count(1), os.getpid()
        n = next(_inits)
    base = f"{socket.gethostname()}:{os.getpid()}"
    return base if n == 1 else f"{base}/{n}"

"""What the three integrations share: a lazily started run, rank-aware names, config merging."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import redis

from .. import protocol as proto
from .._init import init
from .._run import Run
from .._settings import Settings
from .._values import clean_config, to_number
from ..protocol import State

log = logging.getLogger("pluto")


def missing(framework: str, pip: str) -> ImportError:
    return ImportError(f"pluto.integrations needs {framework} for this class: "
                       f"pip install {pip}")


class RankLogger:
    """Owns (or borrows) one process's run and turns framework metrics into ``run.log`` calls.

    ``rank`` is the framework's global rank when it knows it (it may spawn the processes itself,
    without ``RANK`` in their environment); else pluto's own rule (launcher variables, then
    ``torch.distributed``).
    """

    def __init__(self, *, project: str | None, name: str | None, run_id: str | None,
                 tags: list[str] | None, config: Mapping[str, Any] | None, run: Run | None,
                 rank_zero_only: bool) -> None:
        self.project, self.name, self.run_id, self.tags = project, name, run_id, tags
        self.rank_zero_only = rank_zero_only
        self._config = sanitize(config) if config is not None else None
        self._run = run
        self._owned = run is None
        self.rank: int | None = run.rank if run is not None else None
        self.skipped: set[str] = set()
        """Names of values that were not numbers (strings, lists): not metrics, left out."""

    def my_rank(self) -> int:
        if self.rank is None:
            self.rank = Settings.from_env().rank
        return self.rank

    @property
    def active(self) -> bool:
        """False on ranks other than 0 with ``rank_zero_only``: they start no run at all."""
        return not (self.rank_zero_only and self.my_rank() != 0)

    def run(self) -> Run | None:
        if self._run is None and self.active:
            self._run = init(project=self.project, name=self.name, run_id=self.run_id,
                             tags=self.tags, config=self._config,
                             settings={"rank": self.my_rank()})
            self._config = None  # it travelled with init
        return self._run

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        run = self.run()
        if run is None:
            return
        suffix = "" if self.rank_zero_only else f"/rank{run.rank}"
        data: dict[str, int | float] = {}
        for key, value in metrics.items():
            number = to_number(value)
            if number is None:
                if key not in self.skipped:
                    self.skipped.add(key)
                    log.info("pluto: %r is not a number (%s); not logged as a metric",
                             key, type(value).__name__)
                continue
            data[f"{key}{suffix}"] = number
        if data:
            run.log(data, step=step)

    def merge_config(self, config: Mapping[str, Any]) -> None:
        """Merge hyperparameters into the run's config (rank 0's; other ranks' would repeat it)."""
        clean = sanitize(config)
        if self._run is None:
            self._config = {**(self._config or {}), **clean}
            return
        merge_config(self._run, clean)

    def finish(self, failed: bool = False) -> None:
        if self._run is not None and self._owned:
            self._run.finish(state=State.FAILED if failed else State.FINISHED)


def merge_config(run: Run, config: dict[str, Any]) -> None:
    """Send a config merge for a run that already exists (one control-stream XADD)."""
    clean = clean_config(config) or {}
    run.config.update(clean)
    client = run._client
    if client is None or not clean:
        return
    try:
        fields: Any = proto.control_config(run.id, clean)
        client.xadd(run._keys.control, fields)
    except redis.RedisError as exc:
        log.warning("pluto: could not send the config of run %r (%s); it is not stored",
                    run.run_id, exc)


def sanitize(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Hyperparameters as JSON-safe data: numbers and strings kept, anything else as its repr
    (a framework's config holds classes, dtypes, paths that ``init`` would refuse)."""
    if not isinstance(config, Mapping):
        config = dict(getattr(config, "__dict__", {}) or {})
    return {str(k): _value(v) for k, v in config.items()}


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, Mapping):
        return sanitize(v)
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    number = to_number(v)
    if number is not None:
        return number if not (isinstance(number, float) and not math.isfinite(number)) else str(v)
    return repr(v) if not isinstance(v, type) else v.__qualname__

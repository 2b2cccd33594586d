"""PyTorch Lightning: ``PlutoLogger``, a Lightning ``Logger`` that writes into a pluto run.

>>> from pluto.integrations.lightning import PlutoLogger
>>> trainer = lightning.Trainer(logger=PlutoLogger(project="llm", name="baseline"))

Lightning calls ``log_metrics`` on every rank; each logs ``<metric>/rank<N>`` (the rank is
Lightning's global rank) into the one run, unless ``rank_zero_only=True``. ``log_hyperparams``
merges into the run's config. The run finishes at process exit (or ``experiment.finish()``),
so ``fit`` then ``test`` log into one run; ``finalize("failed")`` finishes it as failed.
Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``.
"""

from __future__ import annotations

from typing import Any

from ._common import missing

__all__ = ["PlutoLogger"]

PlutoLogger: Any  # built on first access by __getattr__ below (the framework loads then)


def _base() -> tuple[type, Any]:
    """Lightning's ``Logger`` and its rank, from whichever Lightning package is installed."""
    try:
        from lightning.pytorch.loggers.logger import Logger
        from lightning.pytorch.utilities.rank_zero import rank_zero_only
    except ImportError:
        try:
            from pytorch_lightning.loggers.logger import Logger  # type: ignore[no-redef,assignment]
            from pytorch_lightning.utilities import rank_zero  # type: ignore[no-redef]

            rank_zero_only = rank_zero.rank_zero_only
        except ImportError:
            raise missing("PyTorch Lightning", "lightning") from None
    return Logger, rank_zero_only


def _build() -> type:
    from ._common import RankLogger

    Logger, rank_zero_only = _base()

    class PlutoLogger(Logger):  # type: ignore[misc,valid-type]
        """A Lightning logger for pluto; arguments as ``pluto.init``, plus ``run`` (an existing
        run to log into, which this logger then never finishes) and ``rank_zero_only``."""

        def __init__(self, project: str | None = None, name: str | None = None,
                     run_id: str | None = None, tags: list[str] | None = None,
                     config: dict[str, Any] | None = None, run: Any = None,
                     rank_zero_only: bool = False) -> None:
            super().__init__()
            self._pluto = RankLogger(project=project, name=name, run_id=run_id, tags=tags,
                                     config=config, run=run, rank_zero_only=rank_zero_only)

        def _sync_rank(self) -> None:
            rank = getattr(rank_zero_only, "rank", None)
            if self._pluto._run is None and isinstance(rank, int):
                self._pluto.rank = rank

        @property
        def name(self) -> str:
            run = self._pluto._run
            return str((run.name if run is not None else None) or self._pluto.name or "pluto")

        @property
        def version(self) -> str:
            run = self._pluto._run
            return str(run.run_id if run is not None else self._pluto.run_id or "")

        @property
        def experiment(self) -> Any:
            """The ``pluto.Run`` (started on first use; None on skipped ranks)."""
            self._sync_rank()
            return self._pluto.run()

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self._sync_rank()
            self._pluto.log(metrics, step=step)

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            self._sync_rank()
            if not self._pluto.active or self._pluto.my_rank() != 0:
                return  # every rank holds the same hyperparameters: rank 0's are merged
            self._pluto.merge_config(_flat_params(params))

        def finalize(self, status: str) -> None:
            """Lightning calls this after each ``fit``/``test``: the run stays open for the next
            one (it finishes at process exit, or with ``logger.experiment.finish()``), except
            that a failed training finishes it as failed."""
            if status not in ("success", "finished"):
                self._pluto.finish(failed=True)

        def save(self) -> None:
            """Nothing to save: everything already streams to Redis."""

    PlutoLogger.__module__ = __name__
    PlutoLogger.__qualname__ = "PlutoLogger"
    return PlutoLogger


def _flat_params(params: Any) -> dict[str, Any]:
    try:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    except ImportError:
        return dict(params if isinstance(params, dict) else vars(params))
    return _flatten_dict(_convert_params(params))


def __getattr__(attr: str) -> Any:
    if attr == "PlutoLogger":
        cls = _build()
        globals()["PlutoLogger"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")

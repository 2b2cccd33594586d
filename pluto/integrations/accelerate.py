"""Hugging Face Accelerate: ``PlutoTracker``, a ``GeneralTracker`` for ``Accelerator(log_with=)``.

>>> from pluto.integrations.accelerate import PlutoTracker
>>> tracker = PlutoTracker(project="llm", name="baseline")
>>> accelerator = Accelerator(log_with=tracker)
>>> accelerator.init_trackers("llm", config={"lr": 3e-4})
>>> accelerator.log({"loss": loss}, step=step)    # main process only (Accelerate's rule)
>>> tracker.log({"loss": loss}, step=step)        # every rank: loss/rank<N>

Accelerate runs ``Accelerator.log`` on the main process only; call the tracker's own ``log`` to
log from every rank. ``rank_zero_only=True`` drops the rank suffix and logs from rank 0 alone.
``accelerator.end_training()`` finishes the run this tracker started.
"""

from __future__ import annotations

from typing import Any

from ._common import missing

__all__ = ["PlutoTracker"]

PlutoTracker: Any  # built on first access by __getattr__ below (the framework loads then)


def _build() -> type:
    from ._common import RankLogger

    try:
        from accelerate.tracking import GeneralTracker
    except ImportError:
        raise missing("Hugging Face Accelerate", "accelerate") from None

    class PlutoTracker(GeneralTracker):  # type: ignore[misc,valid-type]
        """Arguments as ``pluto.init``, plus ``run`` (an existing run, never finished here) and
        ``rank_zero_only``."""

        name = "pluto"
        requires_logging_directory = False
        main_process_only = False  # Accelerator.log already is; tracker.log works on every rank

        def __init__(self, project: str | None = None, name: str | None = None,
                     run_id: str | None = None, tags: list[str] | None = None,
                     config: dict[str, Any] | None = None, run: Any = None,
                     rank_zero_only: bool = False) -> None:
            super().__init__()
            self._pluto = RankLogger(project=project, name=name, run_id=run_id, tags=tags,
                                     config=config, run=run, rank_zero_only=rank_zero_only)
            self.run_name = name

        def _sync_rank(self) -> None:
            if self._pluto._run is None:
                try:
                    from accelerate.state import PartialState

                    self._pluto.rank = int(PartialState().process_index)
                except Exception:  # noqa: BLE001, S110 - no state yet: pluto's own rank rule
                    pass

        @property
        def tracker(self) -> Any:
            """The ``pluto.Run`` (started on first use; None on skipped ranks)."""
            self._sync_rank()
            return self._pluto.run()

        def start(self) -> None:
            self._sync_rank()
            self._pluto.run()

        def store_init_configuration(self, values: dict[str, Any]) -> None:
            self._pluto.merge_config(values)

        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            self._sync_rank()
            self._pluto.log(values, step=step)

        def finish(self) -> None:
            self._pluto.finish()

    PlutoTracker.__module__ = __name__
    PlutoTracker.__qualname__ = "PlutoTracker"
    return PlutoTracker


def __getattr__(attr: str) -> Any:
    if attr == "PlutoTracker":
        cls = _build()
        globals()["PlutoTracker"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")

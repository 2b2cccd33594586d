"""Hugging Face Transformers: ``PlutoCallback``, a ``TrainerCallback`` that logs into pluto.

>>> from pluto.integrations.transformers import PlutoCallback
>>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[PlutoCallback(project="llm")])

``on_train_begin`` starts the run (rank 0 passes the ``TrainingArguments`` and model config as
the run's config), ``on_log`` logs ``train/<name>/rank<N>`` (``eval_*`` as ``eval/<name>``) at
``state.global_step`` on every rank unless ``rank_zero_only=True``. The run stays open after
``train()`` (``evaluate()`` logs into it too) and finishes at process exit or
``callback.run.finish()``. Pass ``report_to="none"`` in ``TrainingArguments`` if you do not
want Transformers' own trackers beside it.
"""

from __future__ import annotations

from typing import Any

from ._common import missing

__all__ = ["PlutoCallback"]

PlutoCallback: Any  # built on first access by __getattr__ below (the framework loads then)


def _build() -> type:
    from ._common import RankLogger, sanitize

    try:
        from transformers import TrainerCallback
    except ImportError:
        raise missing("Hugging Face Transformers", "transformers") from None

    class PlutoCallback(TrainerCallback):  # type: ignore[misc,valid-type]
        """Arguments as ``pluto.init``, plus ``run`` (an existing run, never finished here) and
        ``rank_zero_only``."""

        def __init__(self, project: str | None = None, name: str | None = None,
                     run_id: str | None = None, tags: list[str] | None = None,
                     config: dict[str, Any] | None = None, run: Any = None,
                     rank_zero_only: bool = False) -> None:
            self._pluto = RankLogger(project=project, name=name, run_id=run_id, tags=tags,
                                     config=config, run=run, rank_zero_only=rank_zero_only)

        @property
        def run(self) -> Any:
            return self._pluto._run

        def _start(self, args: Any, state: Any, model: Any = None) -> None:
            if self._pluto._run is None:
                self._pluto.rank = int(getattr(args, "process_index", 0) or 0)
                if state.is_world_process_zero:
                    self._pluto.merge_config(_config(args, model, sanitize))
            self._pluto.run()

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           **kwargs: Any) -> None:
            self._start(args, state, model)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            self._start(args, state, kwargs.get("model"))
            self._pluto.log(_rewrite(logs or {}), step=state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """The run stays open: ``trainer.evaluate()`` after ``train()`` still logs into it.
            It finishes at process exit, or with ``callback.run.finish()``."""

    PlutoCallback.__module__ = __name__
    PlutoCallback.__qualname__ = "PlutoCallback"
    return PlutoCallback


def _rewrite(logs: dict[str, Any]) -> dict[str, Any]:
    """``loss`` → ``train/loss``, ``eval_loss`` → ``eval/loss``, ``test_acc`` → ``test/acc``."""
    out = {}
    for key, value in logs.items():
        for head in ("eval", "test"):
            if key.startswith(head + "_"):
                out[f"{head}/{key[len(head) + 1:]}"] = value
                break
        else:
            out[f"train/{key}"] = value
    return out


def _config(args: Any, model: Any, sanitize: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"training_args": sanitize(args.to_sanitized_dict())}
    model_config = getattr(model, "config", None)
    to_dict = getattr(model_config, "to_dict", None)
    if callable(to_dict):
        config["model"] = sanitize(to_dict())
    return config


def __getattr__(attr: str) -> Any:
    if attr == "PlutoCallback":
        cls = _build()
        globals()["PlutoCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")

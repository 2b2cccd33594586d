"""Framework integrations: Lightning, Hugging Face Transformers, Accelerate.

Each submodule imports its framework only when its class is first used, so ``import
pluto.integrations.lightning`` works without Lightning installed and the class itself raises one
``ImportError`` naming the ``pip install`` that fixes it.

>>> from pluto.integrations.lightning import PlutoLogger          # Trainer(logger=PlutoLogger())
>>> from pluto.integrations.transformers import PlutoCallback     # Trainer(callbacks=[...])
>>> from pluto.integrations.accelerate import PlutoTracker        # Accelerator(log_with=...)

All are rank-aware: by default every rank logs, with its rank in each metric name
(``train/loss/rank3``), so the dashboard draws one line per rank; ``rank_zero_only=True`` logs
from rank 0 alone, under the plain names.
"""

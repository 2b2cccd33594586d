"""Per-rank system metrics: CPU %, RSS and the rank's GPUs, sampled on a background thread.

Every few seconds (``PLUTO_SYSTEM_METRICS_INTERVAL``, default 5) the sampler appends one entry
``sys/cpu_percent/rank<N>``, ``sys/rss_mb/rank<N>`` and, when NVML (``pip install nvidia-ml-py``)
finds GPUs, ``sys/gpu<i>_util_percent/rank<N>`` and ``sys/gpu<i>_mem_mb/rank<N>`` for each GPU
this rank uses, so the dashboard draws one line per rank. ``PLUTO_SYSTEM_METRICS=0`` turns it
off. The training thread never runs any of it, and the entries go in at the run's current step
without advancing the user's step counter.

CPU time comes from ``os.times()`` (all threads of this process; may exceed 100 on several
cores, like ``top``), RSS from ``/proc/self/statm`` on Linux, else ``psutil`` when installed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .env import env_number
from .protocol import name_problem

if TYPE_CHECKING:
    from ._run import Run

log = logging.getLogger("pluto")

MIN_INTERVAL = 0.1
_samplers: weakref.WeakKeyDictionary[Any, Sampler] = weakref.WeakKeyDictionary()


def sysmetrics_fields(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``Settings`` fields of this module: ``system_metrics``, ``system_metrics_interval``."""
    raw = env.get("PLUTO_SYSTEM_METRICS", "").strip().lower()
    return {"system_metrics": raw not in ("0", "false", "no", "off"),
            "system_metrics_interval": max(
                env_number(env, "PLUTO_SYSTEM_METRICS_INTERVAL", 5.0), MIN_INTERVAL)}


def append_entry(run: Run, names: tuple[str, ...], values: tuple[float, ...]) -> bool:
    """Queue one entry at the run's current step, as ``Run.log`` lays it out, without a step.

    The flat layout is ``step, time, names, *values``; one ``deque.extend`` of a tuple is atomic
    under the GIL, so the producer never sees half an entry. Names must be valid already.
    """
    queue = run._queue
    if queue is None or run._closed or not names:
        return False
    queue.extend((run._step, time.time(), names, *values))
    return True


def start_sampler(run: Run, starts: list[Callable[[], None]]) -> Sampler | None:
    """The sampler of ``run`` if its settings want one (hook in ``pluto.init``); its thread is
    started by whoever runs ``starts`` (the producer thread, see ``Producer.on_start``)."""
    s = run.settings
    if not s.system_metrics or run._queue is None:
        return None
    sampler = Sampler(run, s.system_metrics_interval, run.rank, s.local_rank)
    _samplers[run] = sampler
    starts.append(sampler.start)
    return sampler


def stop_sampler(run: Run, timeout: float = 1.0) -> None:
    """Stop the sampler of ``run`` (hook in ``Run.finish``, before the final flush)."""
    sampler = _samplers.pop(run, None)
    if sampler is not None:
        sampler.stop(timeout)


class Sampler(threading.Thread):
    """Reads this process's CPU, memory and GPUs every ``interval`` and appends one entry."""

    def __init__(self, run: Run, interval: float, rank: int, local_rank: int) -> None:
        super().__init__(name="pluto-sysmetrics", daemon=True)
        self._run = run
        self._interval = interval
        self._rank = rank
        self._local_rank = local_rank
        self._stopping = threading.Event()
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._gpus: list[tuple[int, Any]] = []
        self._nvml: Any = None
        self.samples = 0

    def run(self) -> None:
        try:
            last_cpu, last_wall = _cpu_seconds(), time.monotonic()
            opened = False
            while not self._stopping.wait(self._interval):
                if not opened:  # at the first sample, not at init: 64 ranks attach at once
                    self._open_nvml()
                    opened = True
                cpu, wall = _cpu_seconds(), time.monotonic()
                values = {"cpu_percent": 100.0 * (cpu - last_cpu) / max(wall - last_wall, 1e-6)}
                last_cpu, last_wall = cpu, wall
                rss = _rss_mb()
                if rss is not None:
                    values["rss_mb"] = rss
                values.update(self._gpu_values())
                self._append(values)
        except Exception:
            log.exception("pluto: system metrics stopped; set PLUTO_SYSTEM_METRICS=0 to silence")
        finally:
            self._close_nvml()

    def _append(self, values: dict[str, float]) -> None:
        key = tuple(values)
        names = self._names.get(key)
        if names is None:
            names = tuple(f"sys/{k}/rank{self._rank}" for k in key)
            bad = [n for n in names if name_problem(n)]
            if bad:  # cannot happen with our own names; refuse rather than send bad entries
                log.warning("pluto: system metric names %s are invalid; not sent", bad)
                return
            self._names[key] = names
        if append_entry(self._run, names, tuple(values.values())):
            self.samples += 1

    def stop(self, timeout: float = 1.0) -> None:
        self._stopping.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    # -- GPUs through NVML, when it is installed and finds devices ------------------------------
    def _open_nvml(self) -> None:
        try:
            import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML library, no driver, no GPU: CPU metrics only
            return
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            # os.environ: CUDA's own variable, not a pluto setting (read when NVML opens)
            indices = _rank_gpus(count, self._local_rank, os.environ.get("CUDA_VISIBLE_DEVICES"))
            self._gpus = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        except Exception as exc:  # noqa: BLE001
            log.warning("pluto: NVML found no usable GPU (%s); system metrics without GPUs", exc)

    def _gpu_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for index, handle in self._gpus:
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # noqa: BLE001 - a GPU that fell off the bus: skip this sample
                continue
            out[f"gpu{index}_util_percent"] = float(util.gpu)
            out[f"gpu{index}_mem_mb"] = mem.used / 2**20
        return out

    def _close_nvml(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001, S110 - shutting NVML down is best effort
                pass


def _rank_gpus(count: int, local_rank: int, visible: str | None) -> list[int]:
    """NVML indices of the GPUs this rank uses: ``CUDA_VISIBLE_DEVICES`` if it lists indices,
    else the one at ``LOCAL_RANK`` (one GPU per rank, torchrun's convention), else all."""
    if visible:
        try:
            listed = [int(v) for v in visible.split(",") if v.strip()]
        except ValueError:  # UUIDs: sample every device rather than guess
            return list(range(count))
        if len(listed) == 1 or local_rank >= len(listed):
            return [i for i in listed[:1] if i < count]
        return [listed[local_rank]] if listed[local_rank] < count else []
    return [local_rank] if local_rank < count else list(range(count))


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_mb() -> float | None:
    """Resident set size in MiB: /proc on Linux, else psutil if installed, else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        return float(psutil.Process().memory_info().rss) / 2**20
    except Exception:  # noqa: BLE001 - neither available: no RSS metric
        return None

"""The process entry point: logging, signals, the startup line, then :meth:`Worker.run`."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import threading
from types import FrameType

from pluto.env import redact

from ._metrics import serve_metrics
from ._settings import WorkerSettings
from ._worker import Worker

log = logging.getLogger("worker")


def main(argv: list[str] | None = None, tenants: list[str] | None = None) -> int:
    """Run the worker with settings from the environment (``tenants``, from ``pluto worker
    --tenant``, win over ``PLUTO_TENANTS``): one :class:`Worker` per tenant, each in a thread
    of its own, so that one tenant's trouble never holds up another's; 0 after a warm stop."""
    settings = WorkerSettings.from_env(tenants=tenants)
    logging.basicConfig(stream=sys.stderr, level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    log.info("pluto worker %s starting: redis %s%s, prefix %r%s, api %s, batch %d",
             settings.name, redact(settings.redis_url), " (cluster)" if settings.cluster else "",
             settings.prefix, "".join(f", tenant {t!r}" for t in settings.tenants if t),
             settings.api_url, settings.batch)
    if not settings.api_key:
        log.warning("PLUTO_API_KEY is not set; the backend will likely answer 401")
    workers = [Worker(each) for each in settings.each()]
    if settings.metrics_port:
        serve_metrics([(w.settings.tenant, w.metrics) for w in workers], settings.metrics_port)
        log.info("Prometheus metrics on port %d (/metrics)", settings.metrics_port)
    _install_signals(workers)
    threads = [threading.Thread(target=w.run, name=f"tenant-{w.settings.tenant}")
               for w in workers[1:]]
    for thread in threads:
        thread.start()
    code = workers[0].run()
    for thread in threads:
        thread.join()
    return code


def _install_signals(workers: list[Worker]) -> None:
    """First SIGTERM/SIGINT: warm stop (finish and ack the batch in hand). Second: exit now."""

    received = itertools.count()

    def handle(signum: int, frame: FrameType | None) -> None:
        # One C call, so a second signal handled inside this handler (Python runs a pending
        # handler at any bytecode boundary, even within another) sees the first one counted.
        if next(received):
            os.write(2, b"second signal: exiting immediately (cold shutdown)\n")
            os._exit(1)
        log.info("%s: finishing the batch in hand, then exiting (again to exit now)",
                 signal.Signals(signum).name)
        for worker in workers:
            worker.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

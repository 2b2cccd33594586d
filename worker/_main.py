"""The process entry point: logging, signals, the startup line, then :meth:`Worker.run`."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from pluto._settings import redact

from ._settings import WorkerSettings
from ._worker import Worker

log = logging.getLogger("worker")


def main(argv: list[str] | None = None) -> int:
    """Run one worker with settings from the environment; 0 after a warm shutdown."""
    settings = WorkerSettings.from_env()
    logging.basicConfig(stream=sys.stderr, level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    log.info("pluto worker %s starting: redis %s%s, prefix %r, api %s, batch %d",
             settings.name, redact(settings.redis_url), " (cluster)" if settings.cluster else "",
             settings.prefix, settings.api_url, settings.batch)
    if not settings.api_key:
        log.warning("PLUTO_API_KEY is not set; the backend will likely answer 401")
    worker = Worker(settings)
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port)
        log.info("Prometheus metrics on port %d (/metrics)", settings.metrics_port)
    _install_signals(worker)
    return worker.run()


def _install_signals(worker: Worker) -> None:
    """First SIGTERM/SIGINT: warm stop (finish and ack the batch in hand). Second: exit now."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if worker.stopping:
            os.write(2, b"second signal: exiting immediately (cold shutdown)\n")
            os._exit(1)
        log.info("%s: finishing the batch in hand, then exiting (again to exit now)",
                 signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

"""One job process: load the model once, then claim and run jobs until told to stop.

The supervisor (dxnode/worklist/supervisor.py) spawns this as each process's target; the composition
root (dxnode/daemon.py) hands it over, so the worklist never imports the job body.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from typing import Any

from dxnode.config import Settings
from dxnode.inference.bundle import BundleError
from dxnode.jobs.body import run_job
from dxnode.logs import setup_logging
from dxnode.model import ModelRegistry
from dxnode.store import Store
from dxnode.worklist import queue
from dxnode.worklist.supervisor import EXIT_CONFIG

log = logging.getLogger("dxnode.jobs.process")


def job_process_main(settings: Settings, log_level: str, parent: int, ready: Any = None, problems: Any = None) -> None:
    """Body of one job process: load the model once, set ready, then claim and run jobs until SIGTERM.

    ready: a multiprocessing Event set once the model is loaded; problems: a queue that gets the
    one-line reason when the model cannot load (the process then exits with EXIT_CONFIG)."""
    setup_logging(log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    registry = ModelRegistry()  # this process's models and decoding threads, kept across its jobs
    try:
        registry.get(settings.model, data_dir=settings.data_dir)
    except (BundleError, FileNotFoundError) as exc:
        log.error("job process cannot load the model: %s", exc)
        if problems is not None:
            problems.put(f"a job process cannot load the model: {exc}".splitlines()[0])
        raise SystemExit(EXIT_CONFIG) from None
    store = Store(settings.database.url, settings.database.busy_timeout_s, settings.database.echo)
    me, supervisor = queue.worker_id(), queue.worker_id(parent)
    if ready is not None:
        ready.set()
    log.info("job process %s ready", me)
    try:
        while not stop.is_set() and os.getppid() == parent:
            if (
                queue.run_one(store, settings, functools.partial(run_job, registry=registry), me, stop, supervisor)
                is None
            ):
                stop.wait(settings.worklist.poll_interval_seconds)
    finally:
        store.dispose()
        registry.close()
    log.info("job process %s stopped", me)

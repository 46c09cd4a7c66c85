"""`dxnode serve` and `dxnode worker`: start the stages of the data path and stop them cleanly.

serve: the SCP receives on its own threads (pynetdicom); one APScheduler BackgroundScheduler runs
the stable-study sweep, the recovery sweep and the outbox; uvicorn serves the web stage on a
thread; jobs run in supervised job processes (dxnode/runner.py), never in this one.
worker: the job processes, the recovery sweep and the outbox only, for scale-out on one PostgreSQL
and one shared data dir.

SIGTERM and SIGINT stop the listener first (no new association), then the scheduler, then the job
processes: each re-queues its job at the next stage boundary; one still running a little before
``[node] stop_timeout_seconds`` is killed and its job re-queued. The process exits within that time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from dxnode.config import Settings
from dxnode.routing import warn_beyond_declaration
from dxnode.store import Store, open_store

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode.model import Classifier
    from dxnode.scp import StorageSCP
    from dxnode.web.server import WebServer

log = logging.getLogger("dxnode.daemon")
Readiness = Callable[[], dict[str, bool]]


def safe_url(url: str) -> str:
    """The database URL with its password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def _load_model(settings: Settings) -> Classifier:
    """Load the configured model once, so a missing or tampered bundle stops the node at start."""
    from dxnode.model import load_classifier

    classifier = load_classifier(settings.model, data_dir=settings.data_dir)
    ident = classifier.identity
    log.info(
        "model %s %s (sha256 %s) on %s%s",
        ident.name,
        ident.version,
        ident.sha256[:12],
        classifier.device,
        " -- UNTRAINED DEMO MODEL: its findings are meaningless" if ident.demo else "",
    )
    return classifier


def _start_scheduler(
    settings: Settings, store: Store, activity: Any = None, supervisor: Any = None, sweep: bool = True
) -> BackgroundScheduler:
    """The background jobs: sweep for stable studies, hand back jobs of stopped workers, send the outbox."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode import worklist

    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    interval = settings.worklist.sweep_interval_seconds
    if sweep:
        scheduler.add_job(
            worklist.sweep,
            "interval",
            args=[store, settings],
            kwargs={"activity": activity},
            seconds=interval,
            id="sweep",
        )

    def recover() -> None:
        worklist.recover(store, settings, exclude=supervisor.workers if supervisor is not None else frozenset())

    scheduler.add_job(recover, "interval", seconds=max(interval, 1.0), id="recover")
    if settings.worklist.run_jobs:
        from dxnode import dispatch

        dispatch.schedule(scheduler, store, settings)
    scheduler.start()
    return scheduler


def _start_web(settings: Settings, store: Store, readiness: Readiness, scp: StorageSCP | None = None) -> WebServer:
    """Serve the REST API and pages; print how to log in. STOW-RS stores through scp when given
    (the receiver whose activity the stable-study sweep watches)."""
    from dxnode.web.app import create_app
    from dxnode.web.server import WebServer

    app = create_app(settings, store, readiness)
    if scp is not None:
        app.state.stow_scp = scp
    server = WebServer(app, settings.web.host, settings.web.port)
    server.start()
    print(f"dxnode web: {server.url}", flush=True)
    if not settings.web.tokens:
        print(
            "dxnode web: no [[web.tokens]] configured, so nobody can log in. Make one with\n"
            "  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'\n"
            'and add to the config:  [[web.tokens]]  name = "admin"  token = "..."  role = "admin"\n'
            '(or set DXNODE_WEB__TOKENS=\'[{"name":"admin","token":"...","role":"admin"}]\')',
            flush=True,
        )
    return server


def _wait_for_signal(fatal: threading.Event | None = None) -> None:
    """Block until SIGTERM or SIGINT (or fatal is set)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if fatal is not None and fatal.is_set():
            return


def _exit_by(deadline: float) -> None:
    """Make sure the process is gone by deadline (time.monotonic()), whatever thread still runs."""

    def watchdog() -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        log.warning("stop_timeout_seconds reached with work still running (an outbox send?): exiting now")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)

    threading.Thread(target=watchdog, name="dxnode-stop-watchdog", daemon=True).start()


def _start_jobs(settings: Settings, store: Store, log_level: str) -> Any:
    """The supervised job processes, when this node runs jobs."""
    from dxnode.runner import Supervisor

    if not settings.worklist.run_jobs:
        return None
    supervisor = Supervisor(settings, store, settings.worklist.workers, log_level)
    supervisor.start()
    return supervisor


def _stop(
    settings: Settings, started: float, scp: Any, scheduler: Any, supervisor: Any, server: Any, store: Store
) -> None:
    """Stop in order within stop_timeout_seconds of started: listener, scheduler, jobs, web."""
    deadline = started + settings.node.stop_timeout_seconds
    _exit_by(deadline - 0.3)
    if scp is not None:
        scp.stop()
    scheduler.shutdown(wait=False)
    if supervisor is not None:
        supervisor.stop(deadline - min(2.0, settings.node.stop_timeout_seconds / 4))
    if server is not None:
        server.stop()
    store.dispose()


def serve(settings: Settings, web: bool = True, log_level: str = "INFO") -> int:
    """Run the node until a signal arrives."""
    from dxnode import worklist
    from dxnode.scp import StorageSCP

    store = open_store(settings)
    log.info("data dir %s, database %s (%s)", settings.data_dir, safe_url(settings.database.url), store.dialect)
    worklist.recover(store, settings)
    warn_beyond_declaration(settings)
    web_on = web and settings.web.enabled
    classifier = _load_model(settings) if web_on else None  # for /api/predict; jobs load their own
    scp = StorageSCP(settings, store)
    scp.start()
    print(
        f"dxnode DICOM: AE title {settings.node.ae_title} listening on {settings.node.host}:{scp.port}"
        + (f" (TLS on {scp.tls_port})" if scp.tls_port else ""),
        flush=True,
    )
    supervisor = _start_jobs(settings, store, log_level)
    scheduler = _start_scheduler(settings, store, scp.activity, supervisor)

    def readiness() -> dict[str, bool]:
        checks = {"database": store.ping(), "model": classifier is not None, "scp": scp.listening}
        if supervisor is not None:
            checks["workers"] = supervisor.alive > 0
        return checks

    server = _start_web(settings, store, readiness, scp) if web_on else None
    try:
        _wait_for_signal(supervisor.fatal if supervisor is not None else None)
    finally:
        log.info("stopping (within %g s)", settings.node.stop_timeout_seconds)
        _stop(settings, time.monotonic(), scp, scheduler, supervisor, server, store)
    return 1 if supervisor is not None and supervisor.fatal.is_set() else 0


def work(settings: Settings, log_level: str = "INFO") -> int:
    """`dxnode worker`: job processes and the outbox only, on a shared database and data dir."""
    from dxnode import worklist

    store = open_store(settings)
    log.info("data dir %s, database %s (%s)", settings.data_dir, safe_url(settings.database.url), store.dialect)
    worklist.recover(store, settings)
    warn_beyond_declaration(settings)
    if not settings.worklist.run_jobs:
        print("dxnode worker: [worklist] run_jobs = false, nothing to do", file=sys.stderr)
        return 2
    supervisor = _start_jobs(settings, store, log_level)
    scheduler = _start_scheduler(settings, store, None, supervisor, sweep=False)
    print(f"dxnode worker: {settings.worklist.workers} job process(es) and the outbox running", flush=True)
    try:
        _wait_for_signal(supervisor.fatal)
    finally:
        log.info("stopping (within %g s)", settings.node.stop_timeout_seconds)
        _stop(settings, time.monotonic(), None, scheduler, supervisor, None, store)
    return 1 if supervisor.fatal.is_set() else 0


def serve_web_only(settings: Settings) -> int:
    """Run only the web stage against the configured database."""
    store = open_store(settings)
    classifier = _load_model(settings)

    def readiness() -> dict[str, bool]:
        return {"database": store.ping(), "model": classifier is not None}

    server = _start_web(settings, store, readiness)
    try:
        _wait_for_signal()
    finally:
        server.stop()
        store.dispose()
    return 0

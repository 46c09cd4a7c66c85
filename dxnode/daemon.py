"""`dxnode serve`: start the stages of the data path in one process and stop them cleanly.

The SCP receives on its own threads (pynetdicom); one APScheduler BackgroundScheduler runs the
stable-study sweep, the job runner and the outbox; uvicorn serves the web stage on a thread.
SIGTERM and SIGINT stop the listener first, then let a running job finish its current step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from dxnode.config import Settings
from dxnode.store import Store, open_store

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode.model import Classifier
    from dxnode.web.server import WebServer

log = logging.getLogger("dxnode.daemon")
Readiness = Callable[[], dict[str, bool]]


def safe_url(url: str) -> str:
    """The database URL with its password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def _load_model(settings: Settings) -> Classifier:
    """Load the configured model once, so a missing or tampered bundle stops the node at start."""
    from dxnode.model import load_classifier

    classifier = load_classifier(settings.model)
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


def _start_scheduler(settings: Settings, store: Store) -> BackgroundScheduler:
    """The background jobs: sweep for stable studies, run queued jobs, send the outbox."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode import worklist

    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    scheduler.add_job(
        worklist.sweep, "interval", args=[store, settings], seconds=settings.worklist.sweep_interval_seconds, id="sweep"
    )
    if settings.worklist.run_jobs:
        from dxnode import dispatch
        from dxnode.analysis import run_job

        scheduler.add_job(
            worklist.drain,
            "interval",
            args=[store, settings, run_job],
            seconds=settings.worklist.poll_interval_seconds,
            id="runner",
        )
        dispatch.schedule(scheduler, store, settings)
    scheduler.start()
    return scheduler


def _start_web(settings: Settings, store: Store, readiness: Readiness) -> WebServer:
    """Serve the REST API and pages; print how to log in."""
    from dxnode.web.app import create_app
    from dxnode.web.server import WebServer

    server = WebServer(create_app(settings, store, readiness), settings.web.host, settings.web.port)
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


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass


def serve(settings: Settings, web: bool = True) -> int:
    """Run the node until a signal arrives."""
    from dxnode import worklist
    from dxnode.scp import StorageSCP

    store = open_store(settings)
    log.info("data dir %s, database %s (%s)", settings.data_dir, safe_url(settings.database.url), store.dialect)
    worklist.recover(store, settings)
    classifier = _load_model(settings) if settings.worklist.run_jobs or web else None
    scp = StorageSCP(settings, store)
    scp.start()
    print(
        f"dxnode DICOM: AE title {settings.node.ae_title} listening on {settings.node.host}:{scp.port}"
        + (f" (TLS on {scp.tls_port})" if scp.tls_port else ""),
        flush=True,
    )
    scheduler = _start_scheduler(settings, store)

    def readiness() -> dict[str, bool]:
        return {"database": store.ping(), "model": classifier is not None, "scp": scp.listening}

    server = _start_web(settings, store, readiness) if web and settings.web.enabled else None
    try:
        _wait_for_signal()
    finally:
        log.info("stopping")
        scp.stop()
        scheduler.shutdown(wait=True)
        if server is not None:
            server.stop()
        store.dispose()
    return 0


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

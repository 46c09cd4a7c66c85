"""`dxnode serve` and `dxnode worker`: start the stages of the data path and stop them cleanly.

serve: the SCP receives on its own threads (pynetdicom), and so does the HL7 MLLP listener with
[hl7] enabled (dxnode/hl7/); one APScheduler BackgroundScheduler runs the stable-study sweep, the
recovery sweep, the outboxes (DICOM, HL7), the fetches from [[sources]] and the retention purge
(dxnode/lifecycle/); uvicorn serves the web stage on a thread; jobs run in supervised job processes
(dxnode/worklist/supervisor.py), never in this one.
worker: the job processes, the recovery sweep and the outbox only, for scale-out on one PostgreSQL
and one shared data dir; with [web] enabled it serves its own /healthz, /readyz and /metrics.

Every process of a node counts into one prometheus_client multiprocess folder,
data_dir/metrics/HOSTNAME-PID (share_metrics), so /metrics shows the job processes' counters too.

The node starts whole or exits: every listen address (DICOM, DICOM TLS, HL7, web) is bound once before
the database opens and the model loads, and a part that cannot start stops the parts already
started; the process then exits with status 2 (EXIT_START) after one line on stderr naming the part
and the cause, e.g. ``dxnode serve: web: 127.0.0.1:8080 is in use (another dxnode?)``. While it
runs, a part that stops (a listener thread, the scheduler, the web server, job processes that cannot
start or load the model) makes it stop the rest and exit with status 1 (EXIT_PART_DIED), one line
naming the part, so systemd starts it again. It never runs half.

SIGTERM and SIGINT stop the listener first (no new association), then the scheduler, then the job
processes: each re-queues its job at the next stage boundary; one still running a little before
``[node] stop_timeout_seconds`` is killed and its job re-queued. The process exits within that time
(status 0).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from dxnode.config import Settings
from dxnode.listen import EXIT_PART_DIED, EXIT_START, StartError, check_addresses
from dxnode.store import Store, open_store

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode.lifecycle.service import Retention
    from dxnode.model import Classifier, ModelRegistry
    from dxnode.receive.ingest import Ingest
    from dxnode.receivers import Receivers
    from dxnode.web.server import WebServer

log = logging.getLogger("dxnode.daemon")
JOB_PROCESS_MAIN = "dxnode.jobs.process:job_process_main"  # what each job process runs
# This module imports no stage at its top: share_metrics() must set PROMETHEUS_MULTIPROC_DIR before
# anything imports prometheus_client (dxnode.metrics, which most stages import). Each function
# below imports the stages it starts after that.
Readiness = Callable[[], dict[str, bool]]


def safe_url(url: str) -> str:
    """The database URL with its password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def _load_model(settings: Settings, registry: ModelRegistry) -> Classifier:
    """Load the configured model once, so a missing or tampered bundle stops the node at start."""
    classifier = registry.get(settings.model, data_dir=settings.data_dir)
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
    settings: Settings,
    store: Store,
    activity: Any = None,
    supervisor: Any = None,
    sweep: bool = True,
    ingest: Ingest | None = None,
) -> BackgroundScheduler:
    """The background jobs: sweep for stable studies, hand back jobs of stopped workers, send the
    outbox; with the receiver's ingest, one fetcher per [[sources]] entry."""
    # start-up time: apscheduler loads only when this runs
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode.worklist import queue

    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    interval = settings.worklist.sweep_interval_seconds
    if sweep:
        scheduler.add_job(
            queue.sweep,
            "interval",
            args=[store, settings],
            kwargs={"activity": activity},
            seconds=interval,
            id="sweep",
        )

    def recover() -> None:
        queue.recover(store, settings, exclude=supervisor.workers if supervisor is not None else frozenset())

    scheduler.add_job(recover, "interval", seconds=max(interval, 1.0), id="recover")
    if settings.worklist.run_jobs:
        # start-up time: loaded only when this part of the node starts
        from dxnode.outbox import dispatch

        dispatch.schedule(scheduler, store, settings)
    if ingest is not None and settings.sources:
        # start-up time: loaded only when this part of the node starts
        from dxnode.sources import fetch

        fetch.schedule(scheduler, store, settings, ingest)
        if settings.ups:
            # start-up time: loaded only when this part of the node starts
            from dxnode.sources import ups

            ups.schedule(scheduler, store, settings)
    # start-up time: loaded only when this part of the node starts
    from dxnode.hl7 import results as hl7_results

    hl7_results.schedule(scheduler, store, settings, results=settings.worklist.run_jobs, orders=sweep)
    scheduler.start()
    return scheduler


def _start_web(
    settings: Settings,
    store: Store,
    readiness: Readiness,
    ingest: Ingest | None = None,
    metrics_dir: Path | None = None,
    worker: bool = False,
    registry: ModelRegistry | None = None,
) -> WebServer:
    """Serve the REST API and pages (a worker: /healthz, /readyz and /metrics only); print how to log in.
    STOW-RS stores through ingest when given (the one the listener shares, whose activity the stable-study
    sweep watches)."""
    # start-up time: loaded only when this part of the node starts
    from dxnode.web.app import create_app, create_metrics_app
    from dxnode.web.server import WebServer

    if worker:
        app = create_metrics_app(settings, store, readiness, metrics_dir)
    else:
        app = create_app(settings, store, readiness, metrics_dir, ingest, registry)
    server = WebServer(app, settings.web.host, settings.web.port)
    server.start()
    print(f"dxnode {'worker metrics' if worker else 'web'}: {server.url}", flush=True)
    if not settings.web.tokens:
        print(
            "dxnode web: no [[web.tokens]] configured, so nobody can log in. Make a token with\n"
            "  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'\n"
            "and add to the config:\n"
            "[[web.tokens]]\n"
            'name = "admin"\n'
            'token = "..."\n'
            'role = "admin"\n'
            '(or set DXNODE_WEB__TOKENS=\'[{"name":"admin","token":"...","role":"admin"}]\')',
            flush=True,
        )
    return server


def listen_addresses(settings: Settings, web: bool, dicom: bool = True) -> list[tuple[str, str, int]]:
    """(part, host, port) of every listener this node is configured to open."""
    node = settings.node
    parts: list[tuple[str, str, int]] = []
    if dicom:
        parts.append(("dicom", node.host, node.port))
        if node.tls_port is not None:
            parts.append(("dicom-tls", node.host, node.tls_port))
    if web:
        parts.append(("web", settings.web.host, settings.web.port))
    if dicom and settings.hl7.enabled:
        parts.append(("hl7", settings.hl7.host, settings.hl7.port))
    return parts


def share_metrics(settings: Settings) -> Path | None:
    """Put this node's processes on one prometheus_client multiprocess folder, data_dir/metrics/HOST-PID.

    Must run before prometheus_client is first imported (dxnode.metrics, dxnode.scp, ...): the job
    processes, spawned later, inherit PROMETHEUS_MULTIPROC_DIR. Folders of this host's nodes that no
    longer run are removed; one per node process, because several nodes may share a data dir.
    Returns None (each process counts for itself) when prometheus_client was imported already.
    """
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client imported before the node started: /metrics shows this process only")
        return None
    root = settings.data_dir / "metrics"
    host = socket.gethostname()
    folder = root / f"{host}-{os.getpid()}"
    try:
        if root.is_dir():
            for old in root.iterdir():
                name, _, pid = old.name.rpartition("-")
                if name == host and pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    except OSError as exc:
        raise StartError("metrics", f"cannot make {folder}: {exc.strerror or exc}") from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Check = Callable[[], "tuple[str, str] | None"]


def _watch(checks: list[Check]) -> StartError | None:
    """Block until SIGTERM or SIGINT (None), or until a part stops running (StartError naming it)."""
    stop = threading.Event()
    before = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            for check in checks:
                if (failed := check()) is not None:
                    return StartError(*failed)
        return None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _scheduler_failure(scheduler: BackgroundScheduler) -> tuple[str, str] | None:
    """The scheduler's thread ended while the node runs (it never should)."""
    thread = getattr(scheduler, "_thread", None)  # APScheduler 3 keeps no public handle on it
    if not scheduler.running or (thread is not None and not thread.is_alive()):
        return "scheduler", "the background scheduler (sweep, recovery, outbox) stopped"
    return None


def _part_checks(
    scp: Any, scheduler: Any, supervisor: Any, server: Any, hl7: Any = None, receivers: Any = None
) -> list[Check]:
    checks: list[Check] = []
    if scp is not None:
        checks.append(scp.failure)
    if receivers is not None:
        checks.append(lambda: ("receive", why) if (why := receivers.failure()) else None)
    if hl7 is not None:
        checks.append(hl7.failure)
    if scheduler is not None:
        checks.append(lambda: _scheduler_failure(scheduler))
    if supervisor is not None:
        checks.append(lambda: ("jobs", why) if (why := supervisor.failure()) else None)
    if server is not None:
        checks.append(lambda: ("web", why) if (why := server.failure()) else None)
    return checks


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
    # start-up time: loaded only when this part of the node starts
    from dxnode.worklist.supervisor import Supervisor

    if not settings.worklist.run_jobs:
        return None
    # Named, not imported: the job stack (model, outputs, outbox) loads in the job processes only.
    supervisor = Supervisor(settings, store, settings.worklist.workers, JOB_PROCESS_MAIN, log_level)
    supervisor.start()
    return supervisor


def _stop(
    settings: Settings,
    started: float,
    scp: Any,
    scheduler: Any,
    supervisor: Any,
    server: Any,
    store: Store | None,
    hl7: Any = None,
    receivers: Receivers | None = None,
) -> None:
    """Stop in order within stop_timeout_seconds of started: listeners (the other receiving processes
    first), scheduler, jobs, web, the commit process (each if started)."""
    deadline = started + settings.node.stop_timeout_seconds
    _exit_by(deadline - 0.3)
    if receivers is not None:
        receivers.stop_receivers()
    if scp is not None:
        scp.stop()
    if hl7 is not None:
        hl7.stop()
    if scheduler is not None and scheduler.running:
        scheduler.shutdown(wait=False)
    if supervisor is not None:
        supervisor.stop(deadline - min(2.0, settings.node.stop_timeout_seconds / 4))
    if server is not None:
        server.stop()
    if receivers is not None:
        receivers.stop_commit()
    if store is not None:
        store.dispose()


def _refused(command: str, exc: StartError, code: int) -> int:
    """Print the one line that names the part that failed and why; return the exit status."""
    print(f"dxnode {command}: {exc}", file=sys.stderr, flush=True)
    return code


def _open(settings: Settings) -> Store:
    """The node's database, migrated; StartError naming it when it cannot be opened."""
    try:
        return open_store(settings)
    except Exception as exc:
        raise StartError("database", f"{safe_url(settings.database.url)}: {exc}".splitlines()[0]) from exc


def serve(settings: Settings, web: bool = True, log_level: str = "INFO") -> int:
    """Run the node until a signal arrives (0), a part cannot start (2) or a running part stops (1)."""
    web_on = web and settings.web.enabled
    try:
        check_addresses(listen_addresses(settings, web_on))  # before the database and the model: at once
        metrics_dir = share_metrics(settings)  # before anything imports prometheus_client
    except StartError as exc:
        return _refused("serve", exc, EXIT_START)
    # after share_metrics: these import prometheus_client (see the note at the top)
    from dxnode.receive.ingest import Ingest
    from dxnode.receivers import build_listener, shared_out
    from dxnode.worklist import queue, routing, ups_events

    store = scp = scheduler = supervisor = server = hl7 = receivers = None
    try:
        store = _open(settings)
        log.info("data dir %s, database %s (%s)", settings.data_dir, safe_url(settings.database.url), store.dialect)
        queue.recover(store, settings)
        retention = _retention(settings, store)
        routing.warn_beyond_declaration(settings)
        # start-up time: loaded only when this part of the node starts
        from dxnode.model import ModelRegistry

        models = ModelRegistry()  # the web app's (/api/predict); each job process has its own
        classifier = _model(settings, models) if web_on else None
        ingest = Ingest(shared_out(settings), store)  # one durable receive path for C-STORE and STOW-RS
        receivers = _start_receivers(settings, ingest, log_level)
        scp = build_listener(settings, store, ingest, receivers.share if receivers is not None else None)
        scp.start()
        if receivers is not None:
            try:
                receivers.start_receivers(scp.sockets)
            except RuntimeError as exc:
                raise StartError("receive", str(exc)) from None
        print(
            f"dxnode DICOM: AE title {settings.node.ae_title} listening on {settings.node.host}:{scp.port}"
            + (f" (TLS on {scp.tls_port})" if scp.tls_port else "")
            + (f", {settings.node.receive_processes} receiving processes" if receivers is not None else ""),
            flush=True,
        )
        hl7 = _start_hl7(settings, store)
        supervisor = _start_jobs(settings, store, log_level)
        scheduler = _start_scheduler(settings, store, ingest.activity, supervisor, ingest=ingest)
        retention.activity = ingest.activity
        retention.schedule(scheduler)
        ups_events.schedule(scheduler, store, settings)  # the UPS event reports ([ups_watch])
        ready_store, ready_scp, ready_jobs = store, scp, supervisor

        def readiness() -> dict[str, bool]:
            checks = {"database": ready_store.ping(), "model": classifier is not None, "scp": ready_scp.listening}
            if ready_jobs is not None:
                checks["workers"] = ready_jobs.alive > 0
            return checks

        server = _start_web(settings, store, readiness, ingest, metrics_dir, registry=models) if web_on else None
    except StartError as exc:
        _stop(settings, time.monotonic(), scp, scheduler, supervisor, server, store, hl7, receivers)
        return _refused("serve", exc, EXIT_START)
    except BaseException:  # an unforeseen error (or Ctrl-C) while starting: nothing may keep running
        _stop(settings, time.monotonic(), scp, scheduler, supervisor, server, store, hl7, receivers)
        raise
    try:
        failed = _watch(_part_checks(scp, scheduler, supervisor, server, hl7, receivers))
    finally:
        log.info("stopping (within %g s)", settings.node.stop_timeout_seconds)
        _stop(settings, time.monotonic(), scp, scheduler, supervisor, server, store, hl7, receivers)
    if failed is not None:
        return _refused("serve", failed, EXIT_PART_DIED)
    _forget(metrics_dir)
    return 0


def _start_receivers(settings: Settings, ingest: Ingest, log_level: str) -> Receivers | None:
    """With [node] receive_processes > 1, the commit process started (the listener's other
    processes start once it listens: Receivers.start_receivers); StartError naming "receive"."""
    if settings.node.receive_processes == 1:
        return None
    # start-up time: loaded only when this part of the node starts
    from dxnode.receive.committer import CommitFailed
    from dxnode.receivers import Receivers

    receivers = Receivers(settings, ingest, log_level)
    try:
        receivers.start_commit()
    except CommitFailed as exc:
        raise StartError("receive", str(exc)) from None
    return receivers


def _start_hl7(settings: Settings, store: Store) -> Any:
    """The [hl7] MLLP listener, started, when it is enabled (StartError naming "hl7" when it cannot bind)."""
    if not settings.hl7.enabled:
        return None
    # start-up time: loaded only when this part of the node starts
    from dxnode.hl7.inbound import make_listener

    listener = make_listener(store, settings)
    listener.start()
    print(f"dxnode HL7: MLLP listening on {settings.hl7.host}:{listener.port}", flush=True)
    return listener


def _retention(settings: Settings, store: Store) -> Retention:
    """The node's retention ([retention]), after finishing the purges a stop interrupted."""
    # start-up time: loaded only when this part of the node starts (it imports prometheus_client)
    from dxnode.lifecycle.service import Retention

    retention = Retention(store, settings)
    if settings.retention.reconcile_at_start:
        retention.finish_interrupted()
    return retention


def _model(settings: Settings, registry: ModelRegistry) -> Classifier:
    """The model, or StartError naming it."""
    # start-up time: loaded only when this part of the node starts
    from dxnode.inference.bundle import BundleError

    try:
        return _load_model(settings, registry)
    except (BundleError, FileNotFoundError) as exc:
        raise StartError("model", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _forget(metrics_dir: Path | None) -> None:
    """Remove this node's multiprocess metrics folder after a clean stop (its counters start again at 0)."""
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def work(settings: Settings, log_level: str = "INFO") -> int:
    """`dxnode worker`: job processes and the outbox, on a shared database and data dir; with [web]
    enabled it serves its own /healthz, /readyz and /metrics on [web] host:port."""
    if not settings.worklist.run_jobs:
        print("dxnode worker: [worklist] run_jobs = false, nothing to do", file=sys.stderr)
        return EXIT_START
    web_on = settings.web.enabled
    try:
        check_addresses(listen_addresses(settings, web_on, dicom=False))
        metrics_dir = share_metrics(settings)  # before anything imports prometheus_client
    except StartError as exc:
        return _refused("worker", exc, EXIT_START)
    # after share_metrics: these import prometheus_client (see the note at the top)
    from dxnode.worklist import queue, routing

    store = scheduler = supervisor = server = None
    try:
        store = _open(settings)
        log.info("data dir %s, database %s (%s)", settings.data_dir, safe_url(settings.database.url), store.dialect)
        queue.recover(store, settings)
        routing.warn_beyond_declaration(settings)
        supervisor = _start_jobs(settings, store, log_level)
        scheduler = _start_scheduler(settings, store, None, supervisor, sweep=False)
        ready_store, ready_jobs = store, supervisor

        def readiness() -> dict[str, bool]:
            return {"database": ready_store.ping(), "workers": ready_jobs.alive > 0}

        server = _start_web(settings, store, readiness, None, metrics_dir, worker=True) if web_on else None
        print(f"dxnode worker: {settings.worklist.workers} job process(es) and the outbox running", flush=True)
    except StartError as exc:
        _stop(settings, time.monotonic(), None, scheduler, supervisor, server, store)
        return _refused("worker", exc, EXIT_START)
    except BaseException:
        _stop(settings, time.monotonic(), None, scheduler, supervisor, server, store)
        raise
    try:
        failed = _watch(_part_checks(None, scheduler, supervisor, server))
    finally:
        log.info("stopping (within %g s)", settings.node.stop_timeout_seconds)
        _stop(settings, time.monotonic(), None, scheduler, supervisor, server, store)
    if failed is not None:
        return _refused("worker", failed, EXIT_PART_DIED)
    _forget(metrics_dir)
    return 0


def serve_web_only(settings: Settings) -> int:
    """Run only the web stage against the configured database (/metrics: this process's counters and
    the database's figures; the receiving node's counters are on its own /metrics)."""
    try:
        check_addresses(listen_addresses(settings, True, dicom=False))
        store = _open(settings)
    except StartError as exc:
        return _refused("web", exc, EXIT_START)
    try:
        # start-up time: loaded only when this part of the node starts
        from dxnode.model import ModelRegistry

        models = ModelRegistry()
        classifier = _model(settings, models)

        def readiness() -> dict[str, bool]:
            return {"database": store.ping(), "model": classifier is not None}

        server = _start_web(settings, store, readiness, registry=models)
    except StartError as exc:
        store.dispose()
        return _refused("web", exc, EXIT_START)
    try:
        failed = _watch(_part_checks(None, None, None, server))
    finally:
        server.stop()
        store.dispose()
    return 0 if failed is None else _refused("web", failed, EXIT_PART_DIED)

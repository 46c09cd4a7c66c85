"""What the web application works with, typed once: settings, store, readiness, model, STOW-RS receiver.

create_app builds one WebServices and keeps it on the app; routes reach it through the FastAPI
dependency ``services`` (or by calling it with the request), never through untyped ``app.state`` names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Request

from dxnode.config import Settings
from dxnode.store import Store

if TYPE_CHECKING:
    from dxnode.model import Classifier
    from dxnode.receive.ingest import Ingest
    from dxnode.web.throttle import LoginThrottle

Readiness = Callable[[], dict[str, bool]]


@dataclass(frozen=True)
class WebServices:
    """The services of one web application (a node's, or a worker's metrics-only one)."""

    settings: Settings
    store: Store
    login_throttle: LoginThrottle
    readiness: Readiness | None = None  # None: the database check only
    metrics_dir: Path | None = None  # prometheus_client's multiprocess folder, if any
    classifier: Callable[[], Classifier] | None = None  # the served model (loaded and cached by dxnode.model)
    stow_receiver: Callable[[], Ingest] | None = None  # the durable receive path STOW-RS parts take

    def model(self) -> Classifier:
        """The served model; RuntimeError on an app that serves none (a worker's)."""
        if self.classifier is None:
            raise RuntimeError("this web application serves no model")
        return self.classifier()

    def receiver(self) -> Ingest:
        """The STOW-RS receiver; RuntimeError on an app that takes no STOW-RS (a worker's)."""
        if self.stow_receiver is None:
            raise RuntimeError("this web application takes no STOW-RS")
        return self.stow_receiver()


def services(request: Request) -> WebServices:
    """FastAPI dependency: the services of the application serving the request."""
    return services_of(request.app)


Svc = Annotated[WebServices, Depends(services)]  # a route's parameter `svc: Svc` gets the app's services


def services_of(app: FastAPI) -> WebServices:
    """The services create_app gave an application."""
    found = app.state.services
    if not isinstance(found, WebServices):
        raise TypeError("not a dxnode web application")
    return found


def attach(app: FastAPI, svc: WebServices) -> None:
    """Give an application its services (once, in create_app)."""
    app.state.services = svc


def own_receiver(settings: Settings, store: Store) -> Callable[[], Ingest]:
    """An ingest made on first use, for an app without a DICOM listener (`dxnode web`)."""
    lock = threading.Lock()
    made: list[Ingest] = []

    def receiver() -> Ingest:
        with lock:
            if not made:
                from dxnode.receive.ingest import Ingest  # only once STOW-RS is used: keeps start-up lean

                ingest = Ingest(settings, store)
                ingest.open()
                made.append(ingest)
            return made[0]

    return receiver


def given_receiver(ingest: Ingest) -> Callable[[], Ingest]:
    """The node's own ingest, shared with its listener (`dxnode serve`: the stable-study sweep watches its activity)."""
    return lambda: ingest

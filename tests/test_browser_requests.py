"""The Requests and Orders pages in headless Chromium: a request and an HL7 order (sent over MLLP by the `hl7`
library, with the ACK it got) are listed, a viewer may read both pages but not make a request, an admin makes one
with the page's form."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from conftest import need
from fastapi.testclient import TestClient
from hl7.client import MLLPClient
from sqlalchemy import select
from test_browser import CHROMIUM, SHOTS, logged_in_page
from webnode import ADMIN, BROWSER, READER, make_store, node_settings, processed_study

from dxnode.config import Settings
from dxnode.hl7.inbound import make_listener
from dxnode.schemas import Identifiers
from dxnode.sources.fetch import request_fetch
from dxnode.states import Priority, RequestState
from dxnode.store import FetchRequest, Hl7Order, Job, Study
from dxnode.web.app import create_app
from dxnode.web.server import WebServer

ORDER = "\r".join(
    [
        "MSH|^~\\&|RIS|HOSPITAL|DXNODE|AI|20260101120000||ORM^O01|MSG-1|P|2.3",
        "PID|1||PAT1^^^HOSP||Doe^Jane",
        "ORC|NW|PL1|FI1||||^^^^^S",
        "|".join(["OBR", "1", "PL1", "FI1", "CXR^Chest 2 views^L"] + [""] * 13 + ["ACC-ORD"] + [""] * 5 + ["CR"]),
    ]
)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, int, int]]:
    """The web stage over a store holding a request whose job is done and an order (with its request and ACK)."""
    need(Path(CHROMIUM).exists(), "chromium")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    rules = [{"name": "chest-cr", "procedure_codes": ["CXR"], "source": "archive"}]
    settings = Settings.model_validate(
        node_settings(tmp_path).model_dump()
        | {
            "sources": [{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243}],
            "hl7": {"enabled": True, "host": "127.0.0.1", "port": 0, "rules": rules},
        }
    )
    store = make_store(settings)
    uid = processed_study(store, settings, patient_id="PID-REQ", accession="ACC-REQ")
    request_id = request_fetch(
        store, settings, "archive", Identifiers(accession_number="ACC-REQ"), Priority.HIGH, actor="ris"
    )
    with store.session() as s:  # what the fetcher leaves once it queued the study's (done) job
        row = s.get(FetchRequest, request_id)
        job_id = s.scalar(select(Job.id).join(Study).where(Study.study_instance_uid == uid))
        assert row is not None and job_id is not None
        row.state, row.total, row.retrieved, row.studies, row.job_ids = RequestState.QUEUED, 1, 1, [uid], [job_id]
    listener = make_listener(store, settings)  # the order comes over MLLP from the hl7 library's client
    listener.start()
    try:
        with MLLPClient("127.0.0.1", listener.port) as client:
            ack = hl7.parse(client.send_message(ORDER))
        assert str(ack.segment("MSA")[1]) == "AA", str(ack)
    finally:
        listener.stop()
    with store.session() as s:
        ordered = s.scalar(select(Hl7Order.request_id).where(Hl7Order.accession_number == "ACC-ORD"))
        assert ordered is not None
    server = WebServer(
        create_app(settings, store, lambda: {"database": True, "model": True, "scp": True}), "127.0.0.1", 0
    )
    server.start()
    yield server.url, uid, request_id, ordered
    server.stop()
    store.dispose()


def test_requests_and_orders_pages_read_by_a_viewer_and_asked_by_an_admin(
    served: tuple[str, str, int, int],
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, uid, request_id, ordered = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page, console = logged_in_page(p, url, READER)
        page.click("header >> text=Requests")
        expect(page).to_have_url(url + "requests")
        row = page.locator(f"#request-{request_id}")
        expect(row).to_contain_text("accession ACC-REQ")
        expect(row).to_contain_text("HIGH")
        expect(row.locator(".badge").first).to_have_text("done")
        expect(row.locator(f'a[href="/studies/{uid}"]')).to_have_count(1)
        expect(page.locator("#new-request")).to_have_count(0)  # no form for a viewer
        expect(page.locator("#pager")).to_contain_text("2 in all")  # the request and the order's

        # A viewer's session may read, not ask: the page's POST and the API's are refused, nothing is made.
        statuses = page.evaluate(
            """async () => {
                const form = new URLSearchParams({source: 'archive', what: 'accession_number', value: 'ACC-X'});
                const a = await fetch('/requests', {method: 'POST', body: form});
                const b = await fetch('/api/requests', {method: 'POST', headers: {'Content-Type': 'application/json'},
                    body: JSON.stringify({source: 'archive', identifiers: {accession_number: 'ACC-X'}})});
                return [a.status, b.status];
            }"""
        )
        assert statuses == [403, 403]
        page.reload()
        expect(page.locator("#requests tbody tr")).to_have_count(2)

        page.click("header >> text=Orders")
        order = page.locator("#orders tbody tr").first
        for text in ("RIS", "HOSPITAL", "ACC-ORD", "CXR", "chest-cr", "STAT", "requested"):
            expect(order).to_contain_text(text)
        expect(order.locator(".ack")).to_have_text("AA")
        page.screenshot(path=str(SHOTS / "orders.png"), full_page=True)
        order.locator(f'a[href="/requests?id={ordered}"]').click()
        expect(page.locator("#requests tbody tr")).to_have_count(1)
        expect(page.locator(f"#request-{ordered}")).to_contain_text("waiting for its source")
        page.click("text=Log out")

        # An admin asks with the form: a new request, pending; a wrong value is refused with the reason.
        page.fill("#token", ADMIN)
        page.click("#login-button")
        page.goto(url + "requests")
        page.select_option("select[name=what]", "study_instance_uid")
        page.fill("#request-value", "1.02")
        page.click("#request-button")
        expect(page.locator("#request-error")).to_contain_text("not a valid DICOM UID")
        page.select_option("select[name=what]", "accession_number")
        page.fill("#request-value", "ACC-NEW")
        page.select_option("select[name=priority]", "STAT")
        page.check("input[name=destinations][value=pacs]")
        page.click("#request-button")
        expect(page).to_have_url(url + "requests")
        newest = page.locator("#requests tbody tr").first
        expect(newest).to_contain_text("accession ACC-NEW")
        expect(newest).to_contain_text("to pacs")
        expect(newest).to_contain_text("STAT")
        expect(newest.locator(".badge").first).to_have_text("pending")
        page.screenshot(path=str(SHOTS / "requests.png"), full_page=True)
        browser.close()
    assert not [m for m in console if "Content Security Policy" in m], console


def test_the_requests_page_shows_the_newest_fifty_and_pages_on(tmp_path: Path) -> None:
    """Bounded: 51 requests make two pages, newest first, each linked to the other; anonymous gets the login."""
    settings = Settings.model_validate(
        node_settings(tmp_path).model_dump()
        | {"sources": [{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243}]}
    )
    store = make_store(settings)
    try:
        ids = [
            request_fetch(store, settings, "archive", Identifiers(accession_number=f"A{n}"), actor="ris")
            for n in range(51)
        ]
        client = TestClient(create_app(settings, store), headers=BROWSER)
        for path in ("/requests", "/orders"):
            assert client.get(path, follow_redirects=False).headers["location"] == "/login"
        assert client.post("/login", data={"token": READER}, follow_redirects=False).status_code == 303
        first, second = client.get("/requests").text, client.get("/requests", params={"page": 2}).text
        assert first.count('<tr id="request-') == 50 and f'id="request-{ids[-1]}"' in first
        assert f'id="request-{ids[0]}"' not in first and 'href="?page=2"' in first and "51 in all" in first
        assert second.count('<tr id="request-') == 1 and f'id="request-{ids[0]}"' in second
        assert 'href="?page=1"' in second and 'id="older"' not in second
        assert "No HL7 order yet." in client.get("/orders").text
    finally:
        store.dispose()

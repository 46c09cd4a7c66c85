"""The study and results pages as a radiologist reads them: dates as dates, readable heatmap captions, a click
enlarges an image, and each result names the modality and body part it was found on.

The page HTML through the real app first; then headless Chromium (screenshots under artifacts/screenshots/).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from test_browser import CHROMIUM, SHOTS, logged_in_page
from webnode import BROWSER, READER, make_store, node_settings, processed_study

from dxnode.config import Settings
from dxnode.store import Series, Store, Study
from dxnode.web.app import create_app
from dxnode.web.pages import dicom_date, timestamp

PID = "PID-PAGES-3"
ISO_WITH_SECONDS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")  # what the pages showed before
SHOWN_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} [A-Z]")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store, str]]:
    tmp = tmp_path_factory.mktemp("webpages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "torch-home"))  # no ImageNet file: the demo model
        settings = node_settings(tmp)
        store = make_store(settings)
        uid = processed_study(store, settings, patient_id=PID)
        with store.session() as s:  # the series as a CT of the knee: a chest model's finding on it should stand out
            study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == uid))
            s.execute(update(Series).where(Series.study_id == study_id).values(body_part_examined="KNEE"))
        yield settings, store, uid
    store.dispose()


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The node's local time zone set to UTC (the pages show times in it, with its name)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def reader(settings: Settings, store: Store) -> TestClient:
    client = TestClient(create_app(settings, store), headers=BROWSER)
    assert client.post("/login", data={"token": READER}, follow_redirects=False).status_code == 303
    return client


def test_dates_and_times_are_shown_as_such() -> None:
    assert dicom_date("20040826") == "2004-08-26"
    assert dicom_date("2004") == "2004" and dicom_date("") == "" and dicom_date("20041399") == "20041399"
    assert timestamp("2026-12-06T22:47:24.123456") == "2026-12-06 22:47 UTC"  # naive: UTC, as the store writes
    assert timestamp("2026-12-06T22:47:24.123456Z") == "2026-12-06 22:47 UTC"
    assert timestamp(None) == "" and timestamp("yesterday") == "yesterday"


def test_study_page_shows_dates_captions_and_zoom_links(node: tuple[Settings, Store, str]) -> None:
    settings, store, uid = node
    page = reader(settings, store).get(f"/studies/{uid}").text
    assert "Study date 2024-01-02" in page and "20240102" not in page
    jobs = page.split("<h3>Jobs</h3>", 1)[1].split("<pre>", 1)[0]
    assert SHOWN_TIME.search(jobs) and not ISO_WITH_SECONDS.search(jobs)
    assert "CT (KNEE)" in page
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    heatmap = [c for c in captions if c.startswith("AI GENERATED")]
    assert heatmap and "probability" in heatmap[0] and "threshold" in heatmap[0]
    assert len(re.findall(r'<a class="zoom" href="/api/(outputs|instances)/', page)) == len(captions)
    assert '<script src="/static/study.js"' in page  # the zoom works for every role, not only admins


def test_results_list_names_modality_and_body_part(node: tuple[Settings, Store, str]) -> None:
    settings, store, _ = node
    client = reader(settings, store)
    page = client.get("/results").text
    assert "<th>Modality</th><th>Body part</th>" in page
    assert '<td class="modality">CT</td><td class="body-part">KNEE</td>' in page
    assert not ISO_WITH_SECONDS.search(page.split('id="results"', 1)[1])
    api = client.get("/api/results").json()
    assert {(r["modality"], r["body_part_examined"]) for r in api} == {("CT", "KNEE")}
    dashboard = client.get("/dashboard.json").json()["studies"][0]
    assert dashboard["study_date"] == "20240102" and dashboard["study_date_shown"] == "2024-01-02"
    assert SHOWN_TIME.match(dashboard["last_received_shown"])


@pytest.fixture
def served(node: tuple[Settings, Store, str]) -> Iterator[tuple[str, str]]:
    # start-up time: the web server is only needed by the browser test
    from dxnode.web.server import WebServer

    need(Path(CHROMIUM).exists(), "chromium")
    settings, store, uid = node
    server = WebServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    yield server.url, uid
    server.stop()


def test_click_enlarges_an_image_with_a_readable_caption_in_chromium(served: tuple[str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, uid = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page, console = logged_in_page(p, url, READER)
        expect(page).to_have_url(url)
        page.goto(url + f"studies/{uid}")
        thumb = page.locator("#overlays img.heatmap").first
        page.wait_for_function("[...document.querySelectorAll('#overlays img.heatmap')].every(i => i.naturalWidth > 0)")
        caption = page.locator("#overlays figcaption").first
        expect(caption).to_contain_text("probability")
        size = float(caption.evaluate("e => getComputedStyle(e).fontSize").removesuffix("px"))
        assert size >= 13
        page.screenshot(path=str(SHOTS / "study-captions.png"), full_page=True)
        small = thumb.bounding_box()
        assert small is not None
        thumb.click()
        zoomed = page.locator("#zoom-image")
        expect(page.locator("#zoom")).to_be_visible()
        page.wait_for_function("document.getElementById('zoom-image').naturalWidth > 0")
        big = zoomed.bounding_box()
        assert big is not None and big["width"] > 1.15 * small["width"], (small, big)
        expect(page.locator("#zoom-caption")).to_contain_text("AI GENERATED")
        page.screenshot(path=str(SHOTS / "study-zoom.png"))
        page.mouse.click(5, 5)  # a click closes it
        expect(page.locator("#zoom")).to_be_hidden()
        page.goto(url + "results")
        expect(page.locator("#results td.body-part").first).to_have_text("KNEE")
        page.screenshot(path=str(SHOTS / "results.png"), full_page=True)
        browser.close()
    assert not [m for m in console if "Content Security Policy" in m], console

"""The web pages in headless Chromium: log in, upload a DICOM file, open a processed study.

Screenshots are kept under artifacts/screenshots/ (CI artifacts; see the README).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need
from pydicom.data import get_testdata_file
from webnode import ADMIN, make_store, node_settings, processed_study

from dxnode.web.app import create_app
from dxnode.web.server import WebServer

SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def logged_in_page(p: object, url: str, token: str) -> tuple[object, object, list[str]]:
    """Chromium at 1400x900, logged in with token at url: (browser, page, the console's messages)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)  # type: ignore[attr-defined]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    page.goto(url + "login")
    page.fill("#token", token)
    page.click("#login-button")
    return browser, page, console


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    need(Path(CHROMIUM).exists(), "chromium")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    settings = node_settings(tmp_path)
    store = make_store(settings)
    uid = processed_study(store, settings, patient_id="PID-BROWSER")
    server = WebServer(
        create_app(settings, store, lambda: {"database": True, "model": True, "scp": True}), "127.0.0.1", 0
    )
    server.start()
    yield server.url, uid
    server.stop()
    store.dispose()


def test_login_upload_and_study_page_in_chromium(served: tuple[str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, uid = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        console: list[str] = []  # a Content-Security-Policy violation shows up here
        page.on("console", lambda m: console.append(m.text))
        page.goto(url)
        expect(page).to_have_url(url + "login")
        page.fill("#token", "wrong")
        page.click("#login-button")
        expect(page.locator("#login-error")).to_be_visible()
        page.fill("#token", ADMIN)
        page.click("#login-button")
        expect(page.locator("#studies")).to_contain_text("PID-BROWSER")
        expect(page.locator("#demo-banner")).to_be_visible()
        page.screenshot(path=str(SHOTS / "dashboard.png"), full_page=True)

        page.goto(url + "upload")
        page.set_input_files(
            "#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}]
        )
        expect(page.locator("#status")).to_contain_text("Error 415: not a readable")
        page.set_input_files("#file", get_testdata_file("CT_small.dcm"))
        rows = page.locator("#predictions tbody tr")
        expect(rows).to_have_count(3, timeout=60000)
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
        page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
        page.screenshot(path=str(SHOTS / "upload.png"), full_page=True)

        page.goto(url + f"studies/{uid}")
        expect(page.locator("#findings tbody tr")).not_to_have_count(0)
        page.wait_for_function("[...document.querySelectorAll('#overlays img.heatmap')].some(i => i.naturalWidth > 0)")
        page.wait_for_function("[...document.querySelectorAll('#overlays img.source')].some(i => i.naturalWidth > 0)")
        expect(page.locator("#sr-summary")).to_contain_text("AI-generated")
        page.screenshot(path=str(SHOTS / "study.png"), full_page=True)
        page.click("#ignore")  # admin buttons post to the API with the session cookie, then reload
        expect(page.locator("#ignore")).to_have_text("Stop ignoring")
        expect(page.locator(".badge.ignored")).to_have_text("ignored")
        page.click("#ignore")
        expect(page.locator("#ignore")).to_have_text("Ignore study")

        page.goto(url + "results?positive=true")
        expect(page.locator("#csv")).to_have_attribute("href", "/api/results.csv?positive=true")
        page.goto(url)  # the dashboard's live refresh runs from its static script under the CSP
        expect(page.locator("#updated")).to_contain_text("updated", timeout=15000)
        page.click("text=Log out")
        expect(page).to_have_url(url + "login")
        browser.close()
    assert not [m for m in console if "Content Security Policy" in m], console
    assert (SHOTS / "study.png").stat().st_size > 10_000

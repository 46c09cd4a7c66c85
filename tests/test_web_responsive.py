"""POST /api/predict runs off the event loop: while an upload is analysed, other requests answer at once."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from webnode import READER, make_store, node_settings

from dxnode.web.app import create_app
from dxnode.web.server import WebServer

H = {"Authorization": f"Bearer {READER}"}


def big_png(side: int) -> bytes:
    """A noise PNG large enough that decoding, the heatmap and its PNG take a good part of a second."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.slow
def test_health_and_api_answer_within_100_ms_while_an_upload_is_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet file: the demo model
    settings = node_settings(tmp_path, max_upload_mb=64)
    store = make_store(settings)
    server = WebServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    try:
        with httpx.Client(base_url=server.url.rstrip("/"), timeout=60) as client:
            assert client.get("/api/model", headers=H).status_code == 200  # the model is loaded before timing
            upload = big_png(2500)
            spans: list[float] = []
            done = threading.Event()

            def predict() -> None:
                with httpx.Client(base_url=server.url.rstrip("/"), timeout=120) as c:
                    start = time.monotonic()
                    r = c.post("/api/predict", files={"file": ("big.png", upload)}, headers=H)
                    spans.append(time.monotonic() - start)
                    assert r.status_code == 200, r.text
                done.set()

            worker = threading.Thread(target=predict)
            worker.start()
            time.sleep(0.1)  # the upload is read and the analysis started
            health, api = [], []
            while not done.is_set():
                t0 = time.monotonic()
                assert client.get("/healthz").status_code == 200
                health.append(time.monotonic() - t0)
                t0 = time.monotonic()
                assert client.get("/api/studies", headers=H).status_code == 200
                api.append(time.monotonic() - t0)
                time.sleep(0.02)
            worker.join()
        assert spans and spans[0] > 0.4, f"the prediction took {spans} s: too quick to show anything"
        assert len(health) >= 5, f"only {len(health)} requests while the upload was analysed"
        print(
            f"predict {spans[0] * 1e3:.0f} ms; during it {len(health)} x /healthz, max {max(health) * 1e3:.0f} ms;"
            f" /api/studies max {max(api) * 1e3:.0f} ms"
        )
        assert max(health) < 0.1, f"/healthz took up to {max(health) * 1e3:.0f} ms"
        assert max(api) < 0.1, f"/api/studies took up to {max(api) * 1e3:.0f} ms"
    finally:
        server.stop()
        store.dispose()

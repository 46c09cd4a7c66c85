"""POST /api/predict with PNG/JPEG in their usual pixel modes, broken files, top_k bounds, and [web] keep_uploads."""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from webnode import READER, make_store, node_settings

from dxnode.config import Settings
from dxnode.store import Audit, Store
from dxnode.web.app import create_app

H = {"Authorization": f"Bearer {READER}"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store]]:
    tmp = tmp_path_factory.mktemp("webupload")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "torch-home"))  # no ImageNet file: the demo model
        mp.setattr(tempfile, "tempdir", str(tmp / "system-tmp"))  # to see what an upload leaves behind
        (tmp / "system-tmp").mkdir()
        settings = node_settings(tmp, max_upload_mb=1)
        store = make_store(settings)
        yield settings, store
    store.dispose()


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def picture(mode: str) -> Image.Image:
    """A 64x80 noise picture converted to a PIL mode ('I;16' is 16-bit grayscale)."""
    rng = np.random.default_rng(7)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (64, 80), dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).convert(mode)


def data_url_image(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("RGB", "JPEG"), ("CMYK", "JPEG")],
)
def test_png_and_jpeg_uploads_give_findings_and_a_heatmap(node, mode: str, fmt: str) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    client = TestClient(create_app(settings, store))
    r = client.post("/api/predict", files={"file": (f"x.{fmt.lower()}", encoded(picture(mode), fmt))}, headers=H)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = [f["probability"] for f in body["findings"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    model = client.get("/api/model", headers=H).json()
    assert body["model"]["name"] == model["name"] and body["model"]["version"] == model["version"]
    assert {f["label"] for f in body["findings"]} <= set(model["labels"])
    heatmap, image = data_url_image(body["heatmap_png"]), data_url_image(body["image_png"])
    assert heatmap.mode == "RGB" and min(heatmap.size) > 1 and min(image.size) > 1


def test_top_k_is_bounded(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    client = TestClient(create_app(settings, store))
    png = encoded(picture("L"), "PNG")
    labels = client.get("/api/model", headers=H).json()["labels"]
    k = min(5, len(labels))
    assert (
        len(
            client.post("/api/predict", params={"top_k": k}, files={"file": ("a.png", png)}, headers=H).json()[
                "findings"
            ]
        )
        == k
    )
    for bad in (0, 21, "three"):
        assert (
            client.post("/api/predict", params={"top_k": bad}, files={"file": ("a.png", png)}, headers=H).status_code
            == 422
        )


def test_broken_uploads_get_a_clear_refusal_and_leave_nothing(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    client = TestClient(create_app(settings, store))
    jpeg = encoded(picture("RGB"), "JPEG")
    cases = {
        "cut.jpg": (jpeg[:300], 415, "not a readable image"),
        "anim.gif": (encoded(picture("L"), "GIF"), 415, "not a readable"),
        "empty.png": (b"", 422, "empty file"),
        "nopixels.dcm": (b"\0" * 128 + b"DICM" + b"\xff" * 200, 415, "no pixel data"),
    }
    for name, (data, code, words) in cases.items():
        r = client.post("/api/predict", files={"file": (name, data)}, headers=H)
        assert r.status_code == code and words in r.json()["detail"], (name, r.text)
    assert client.post("/api/predict", headers=H).status_code == 422  # no multipart field "file"
    assert not list(Path(tempfile.gettempdir()).iterdir())  # every temporary upload folder removed
    assert not (settings.data_dir / "uploads").exists()


def test_keep_uploads_keeps_the_bytes_under_the_data_dir_with_a_safe_name(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    keeping = settings.model_copy(update={"web": settings.web.model_copy(update={"keep_uploads": True})})
    client = TestClient(create_app(keeping, store))
    png = encoded(picture("L"), "PNG")
    r = client.post("/api/predict", files={"file": ("../../escape.png", png)}, headers=H)
    assert r.status_code == 200, r.text
    kept = list((settings.data_dir / "uploads").iterdir())
    assert [p.read_bytes() for p in kept] == [png] and "escape" not in kept[
        0
    ].name  # the client's name never becomes a path
    assert not (settings.data_dir.parent / "escape.png").exists()
    with store.session() as s:
        row = s.scalars(select(Audit).where(Audit.action == "api.predict").order_by(Audit.id.desc())).first()
    assert row is not None and row.actor == "bob" and "escape.png" in row.detail and row.source == "testclient"

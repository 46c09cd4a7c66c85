"""The whole loop over DICOMweb with `dxnode serve`: Orthanc STOW-RS -> node -> routed model -> SR/SC STOW-RS -> Orthanc."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from nodeproc import Node, make_study, node_config, wait_port, wait_until
from test_dicomweb_in import STORER
from test_dicomweb_out import orthanc_with_dicomweb, rest


@pytest.mark.slow
def test_orthanc_to_node_to_orthanc_over_stow_rs_with_routing(tmp_path: Path) -> None:
    o_http, web_port = free_port(), free_port()
    orthanc = orthanc_with_dicomweb(
        tmp_path / "orthanc",
        o_http,
        {
            "Servers": {
                "dxnode": {
                    "Url": f"http://127.0.0.1:{web_port}/dicomweb/",
                    "HttpHeaders": {"Authorization": f"Bearer {STORER}"},
                }
            }
        },
    )
    cfg = node_config(
        tmp_path,
        web={
            "enabled": True,
            "host": "127.0.0.1",
            "port": web_port,
            "tokens": [{"name": "orthanc", "token": STORER, "role": "store"}],
        },
        destinations=[{"name": "orthanc-web", "kind": "dicomweb", "url": f"http://127.0.0.1:{o_http}/dicom-web"}],
        models=[
            {"name": "mr-only", "bundle": "demo", "modalities": ["MR"]},
            {"name": "ct-demo", "bundle": "demo", "modalities": ["CT"], "heatmap_for": "top1"},
        ],
    )
    node = Node(cfg)
    try:
        wait_port(web_port, timeout=60)
        base = f"http://127.0.0.1:{o_http}"
        study_uid, paths = make_study(tmp_path / "study", n=2, patient_id="PAT-DICOMWEB")
        for p in paths:
            urllib.request.urlopen(
                urllib.request.Request(f"{base}/instances", data=p.read_bytes(), method="POST"), timeout=30
            ).read()
        orthanc_study = rest(f"{base}/tools/lookup", study_uid.encode())[0]["ID"]
        rest(f"{base}/dicom-web/servers/dxnode/stow", json.dumps({"Resources": [orthanc_study]}).encode())

        def modalities() -> list[str] | None:
            found = sorted(
                s["MainDicomTags"].get("Modality", "") for s in rest(f"{base}/studies/{orthanc_study}/series")
            )
            return found if {"SR", "OT"} <= set(found) or len(found) >= 3 else None

        found = wait_until(modalities, timeout=150, what="SR and SC back in Orthanc")
        assert len(found) == 3 and "SR" in found, found  # the CT series, the SR, the heatmap SC
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        assert [(j["routed_model"], j["state"]) for j in jobs] == [("ct-demo", "done")]
        assert any("not model mr-only" in line for line in jobs[0]["routing"])
        outbox = json.loads(node.cli("outbox", "--json").stdout)
        assert sorted((d["state"], d["http_status"]) for d in outbox) == [("sent", 200), ("sent", 200)]
    finally:
        node.stop()
        orthanc.terminate()
        orthanc.wait(timeout=30)

"""STOW-RS against C-STORE into the same node: one in-process dxnode (SCP and web server, SQLite).

Both paths end in the same durable storing function (temporary file, fsync, rename, rows
committed), so the ratio shows what the transport adds. storescu sends N instances in one
association; STOW-RS sends them in requests of --per-request parts (httpx, keep-alive).
Run: .venv/bin/python -m bench.stow [--count 200] [--per-request 50] [--rounds 3].
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dxnode.config import Settings
from dxnode.outbox.dicomweb import multipart_body
from dxnode.receive.ingest import Ingest
from dxnode.scp import StorageSCP
from dxnode.store import Store, upgrade
from dxnode.web.app import create_app
from dxnode.web.server import WebServer

TOKEN = "bench-store-token-0123456789"


def study(folder: Path, n: int) -> list[Path]:
    """n CT_small instances of one new study."""
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--per-request", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'dxnode.db'}"
        upgrade(url)
        settings = Settings(
            node={"host": "127.0.0.1", "port": 0, "data_dir": root / "var", "min_free_mb": 10},
            database={"url": url},
            web={"tokens": [{"name": "bench", "token": TOKEN, "role": "store"}]},
        )
        store = Store(url)
        ingest = Ingest(settings, store)
        scp = StorageSCP(settings, ingest)
        scp.start()
        web = WebServer(create_app(settings, store, ingest=ingest), "127.0.0.1", 0)
        web.start()
        best = {"C-STORE (storescu)": 0.0, "STOW-RS": 0.0}
        client = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
        for r in range(args.rounds):
            files = study(root / f"c{r}", args.count)
            t = time.perf_counter()
            subprocess.run(
                ["storescu", "-aec", "DXNODE", "127.0.0.1", str(scp.port), *map(str, files)],
                check=True,
                env=dict(os.environ, TCP_NODELAY="1"),  # as in bench.receive: no Nagle delay on DCMTK's side
            )
            best["C-STORE (storescu)"] = max(best["C-STORE (storescu)"], args.count / (time.perf_counter() - t))
            files = study(root / f"s{r}", args.count)
            t = time.perf_counter()
            for i in range(0, len(files), args.per_request):
                body, ctype = multipart_body([p.read_bytes() for p in files[i : i + args.per_request]])
                response = client.post(f"{web.url}dicomweb/studies", content=body, headers={"Content-Type": ctype})
                assert response.status_code == 200, response.text[:300]
            best["STOW-RS"] = max(best["STOW-RS"], args.count / (time.perf_counter() - t))
        client.close()
        web.stop()
        scp.stop()
        store.dispose()
    for name, rate in best.items():
        print(f"{name:20s} {rate:8.1f} instances/s (best of {args.rounds})")
    print(f"STOW-RS / C-STORE    {best['STOW-RS'] / best['C-STORE (storescu)']:8.2f}")


if __name__ == "__main__":
    main()

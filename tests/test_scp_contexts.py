"""serve's DICOM server copies its supported contexts cheaply for each association (receive/server.py)."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom.uid import UID

from dxnode.config import Settings
from dxnode.receive.server import NoDelayServer
from dxnode.scp import StorageSCP


def test_the_contexts_copied_for_an_association_equal_pynetdicoms_deep_copy_and_share_nothing_mutable(
    tmp_path: Path,
) -> None:
    settings = Settings.model_validate({"node": {"host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path)}})
    scp = StorageSCP(settings, None)  # type: ignore[arg-type]  # nothing is received: no ingest
    server = scp.ae.make_server(("127.0.0.1", 0), server_class=NoDelayServer)
    try:
        contexts = server.contexts
        assert len(contexts) > 100
        fast, slow = copy.deepcopy(contexts), copy.deepcopy(list(contexts))  # ours; pynetdicom's own deepcopy
        assert [vars(cx) for cx in fast] == [vars(cx) for cx in slow]
        fast[0].transfer_syntax.append(UID("1.2.3.4"))  # what negotiation may do to its copy
        assert "1.2.3.4" not in contexts[0].transfer_syntax and all(
            a is not b for a, b in zip(fast, contexts, strict=True)
        )
    finally:
        server.server_close()

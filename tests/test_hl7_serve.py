"""HL7 in `dxnode serve`: the listener starts with the node (or stops its start when its port is taken),
and an ordered study pushed by C-STORE comes back to the HL7 receiver as an ORU^R01."""

from __future__ import annotations

import socket
from pathlib import Path

import hl7
from conftest import free_port, need_tool, run
from hl7.client import MLLPClient
from hl7peers import Hl7Receiver
from nodeproc import DXNODE, Node, make_study, node_config, storescu, wait_until

from dxnode.hl7.mllp import CR, EB, SB

ORDER = "\r".join(
    [
        "MSH|^~\\&|RIS|HOSP|DXNODE|AI|20260101120000||ORM^O01|ORD1|P|2.3",
        "PID|1||PAT-E2E^^^HOSP||Test^Patient",
        "ORC|NW|PL1|FI1||||^^^^^S",
        "|".join(["OBR", "1", "PL1", "FI1", "CTCHEST^CT chest^L", *[""] * 13, "ACC123", *[""] * 5, "CT"]),
    ]
)


def test_a_taken_hl7_port_stops_the_start_with_the_part_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = node_config(tmp_path, hl7={"enabled": True, "host": "127.0.0.1", "port": port})
        out = run([DXNODE, "--config", str(config), "serve"], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"dxnode serve: hl7: 127.0.0.1:{port} is in use" in out.stderr


def test_an_ordered_study_comes_back_as_an_oru(tmp_path: Path) -> None:
    need_tool("storescu")
    receiver = Hl7Receiver(["AA"])
    hl7_port = free_port()
    config = node_config(
        tmp_path,
        hl7={
            "enabled": True,
            "host": "127.0.0.1",
            "port": hl7_port,
            "rules": [{"modalities": ["CT"], "source": "pacs"}],
            "destinations": [{"name": "ris", "host": "127.0.0.1", "port": receiver.port}],
        },
    )
    node = Node(config)
    try:
        node.wait_for(rf"dxnode HL7: MLLP listening on 127.0.0.1:{hl7_port}")
        with MLLPClient("127.0.0.1", hl7_port) as client:
            ack = hl7.parse(client.send_message(ORDER).strip(SB + EB + CR).decode())
        assert str(ack.segment("MSA")(1)) == "AA" and "order 1 to fetch from pacs" in str(ack), str(ack)
        _, files = make_study(tmp_path / "study", n=2)  # accession number ACC123, as ordered
        storescu(node.port, files)
        try:
            wait_until(lambda: receiver.messages, timeout=120, what="an ORU^R01 at the HL7 receiver")
        except AssertionError:
            raise AssertionError("no ORU^R01; node output:\n" + "\n".join(node.lines[-60:])) from None
    finally:
        node.stop()
        receiver.stop()
    assert node.proc.returncode == 0, "\n".join(node.lines[-40:])
    [oru] = receiver.messages
    assert oru["MSH.F9.R1.C1"] == "ORU" and oru["OBR.F18"] == "ACC123" and oru["ORC.F2"] == "PL1"
    findings = [seg for seg in oru.segments("OBX") if str(seg(3)(1)(3)) == "99DXNODE"]
    assert findings and all(str(seg(17)(1)(1)) == "AIAST" for seg in findings)

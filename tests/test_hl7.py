"""HL7 orders in over MLLP: the node's listener on a real port, a real SQLite store, and the `hl7` library's
MLLP client as the sender. Every message gets its ACK (AA, AE or AR, with the reason and the HL7 error),
malformed ones included, and a bad message never costs the next one on the same connection."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select

from dxnode.config import ConfigError, Settings, load_settings
from dxnode.hl7.inbound import make_listener
from dxnode.hl7.mllp import CR, EB, SB, MllpListener
from dxnode.states import OrderState, Priority
from dxnode.store import Audit, FetchRequest, Hl7Order, Store, upgrade

RULES = [
    {"name": "chest", "procedure_codes": ["CXR2V"], "source": "pacs"},
    {"name": "ct", "modalities": ["CT"], "source": "pacs", "priority": "high"},
]


def orm(control: str = "MSG1", accession: str = "ACC1", code: str = "CXR2V", priority: str = "S", **kw: str) -> str:
    """An ORM^O01 (v2.3, IHE style: accession number in OBR-18, modality in OBR-24)."""
    msh = kw.get("msh", f"MSH|^~\\&|RIS|HOSP|DXNODE|AI|20260101120000||ORM^O01|{control}|P|{kw.get('version', '2.3')}")
    obr = ["OBR", "1", "PL1", "FI1", f"{code}^Chest 2 views^L"] + [""] * 13 + [accession] + [""] * 5 + ["CR"]
    return "\r".join(
        [
            msh,
            "PID|1||PAT1^^^HOSP||Doe^Jane",
            f"ORC|{kw.get('orc', 'NW')}|PL1|FI1||||^^^^^{priority}",
            "|".join(obr),
        ]
    )


def omi(control: str = "MSG2", accession: str = "ACC2", modality: str = "CT", tq1: str = "R") -> str:
    """An OMI^O23 (v2.5.1: priority in TQ1-9, accession number and modality in IPC)."""
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSP|DXNODE|AI|20260101120000||OMI^O23^OMI_O23|{control}|P|2.5.1",
            "PID|1||PAT2^^^HOSP||Roe^Rick",
            "ORC|NW|PL2|FI2",
            f"TQ1|1||||||||{tq1}",
            "OBR|1|PL2|FI2|CTHEAD^CT head^L",
            f"IPC|{accession}|RP1|1.2.840.99.1|SPS1|{modality}",
        ]
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[MllpListener, Store, Settings]]:
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": url},
        hl7={
            "enabled": True,
            "host": "127.0.0.1",
            "port": 0,
            "rules": RULES,
            "allowed_sending_applications": ["RIS"],
            "max_message_kb": 4,
            "max_field_chars": 200,
        },
    )
    store = Store(url)
    listener = make_listener(store, settings)
    listener.start()
    try:
        yield listener, store, settings
    finally:
        listener.stop()
        store.dispose()


def answer(client: MLLPClient, message: str | bytes) -> hl7.Message:
    """Send one message with the hl7 library's client; the ACK, parsed by the library."""
    data = client.send_message(message)
    while not data.endswith(EB + CR):
        data += client.socket.recv(4096)
    return hl7.parse(data.strip(SB + EB + CR).decode("utf-8"))


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    """MSA-1 (code), MSA-2 (the message's control id), MSA-3 (the reason, unescaped)."""
    seg = ack.segment("MSA")
    return str(seg(1)), str(seg(2)), ack.unescape(str(seg(3)))


def error_code(ack: hl7.Message) -> str:
    """ERR-3.1: the HL7 table 0357 code."""
    return str(ack.segment("ERR")(3)(1)(1))


def orders(store: Store) -> list[Hl7Order]:
    with store.session() as s:
        return list(s.scalars(select(Hl7Order).order_by(Hl7Order.id)))


def test_a_matching_orm_is_recorded_once_with_its_priority(node: tuple[MllpListener, Store, Settings]) -> None:
    listener, store, _ = node
    with MLLPClient("127.0.0.1", listener.port) as client:
        ack = answer(client, orm())
        again = answer(client, orm(control="MSG1b"))
    code, control, text = msa(ack)
    assert (code, control) == ("AA", "MSG1"), text
    assert "accession ACC1" in text and "pending" in text
    assert str(ack.segment("MSH")(9)) == "ACK^O01^ACK" and str(ack.segment("MSH")(5)) == "RIS"
    assert msa(again)[0] == "AA" and "already ordered" in msa(again)[2]
    [order] = orders(store)
    assert (order.source, order.accession_number, order.priority) == ("pacs", "ACC1", Priority.STAT)
    # No [[sources]] entry named "pacs" here: the fetch stage refuses it and the order waits, saying why.
    assert (order.state, order.rule) == (OrderState.PENDING, "chest")
    assert order.detail.startswith("the fetch stage refused it: no [[sources]] entry named 'pacs'")
    assert (order.placer_order, order.procedure_code, order.patient_id) == ("PL1", "CXR2V", "PAT1")
    with store.session() as s:
        assert s.scalar(select(Audit).where(Audit.action == "hl7.order")) is not None


def test_an_omi_by_modality_takes_the_rules_priority_and_its_study_uid(
    node: tuple[MllpListener, Store, Settings],
) -> None:
    listener, store, _ = node
    with MLLPClient("127.0.0.1", listener.port) as client:
        code, _, text = msa(answer(client, omi()))
    assert code == "AA", text
    [order] = orders(store)
    assert (order.accession_number, order.modality, order.priority) == ("ACC2", "CT", Priority.HIGH)
    assert order.study_instance_uid == "1.2.840.99.1"


def test_orders_no_rule_matches_get_aa_and_no_action(node: tuple[MllpListener, Store, Settings]) -> None:
    listener, store, _ = node
    with MLLPClient("127.0.0.1", listener.port) as client:
        code, _, text = msa(answer(client, orm(code="MRKNEE")))
        code2, _, text2 = msa(answer(client, omi(modality="MR")))
    assert (code, code2) == ("AA", "AA")
    assert "no [[hl7.rules]] entry matches: no action" in text and "no action" in text2
    assert orders(store) == []


def test_a_cancel_cancels_and_a_new_order_reopens(node: tuple[MllpListener, Store, Settings]) -> None:
    listener, store, _ = node
    with MLLPClient("127.0.0.1", listener.port) as client:
        answer(client, orm())
        code, _, text = msa(answer(client, orm(control="C1", orc="CA")))
        assert code == "AA" and "cancelled" in text
        assert orders(store)[0].state == OrderState.CANCELLED
        assert msa(answer(client, orm(control="N2")))[0] == "AA"
    [order] = orders(store)
    assert order.state == OrderState.PENDING and order.control_id == "N2"


MALFORMED: list[tuple[str, bytes, str, str, str]] = [
    ("no MSH", b"hello, this is not HL7", "AR", "100", "does not start with an MSH"),
    ("encoding characters", orm().replace("^~\\&", "^~#&", 1).encode(), "AR", "102", "encoding characters"),
    ("version", orm(version="2.1").encode(), "AR", "203", "version '2.1'"),
    ("sender not allowed", orm().replace("|RIS|", "|LIS|", 1).encode(), "AR", "207", "'LIS' is not allowed"),
    ("message type", orm().replace("ORM^O01", "ADT^A01", 1).encode(), "AR", "200", "ADT^A01"),
    ("event", orm().replace("ORM^O01", "ORM^O02", 1).encode(), "AR", "201", "ORM^O02"),
    ("broken segment", orm().replace("\rPID|", "\rp1d|", 1).encode(), "AR", "100", "segment 2"),
    ("huge field", orm().replace("Doe^Jane", "D" * 300, 1).encode(), "AE", "102", "PID^2^5 has 300 characters"),
    ("huge message", (orm() + "\rNTE|1||" + "x" * 150).encode() * 40, "AR", "207", "larger than 4 KiB"),
    ("no accession", orm(accession="").encode(), "AE", "101", "no accession number"),
    ("accession too long", orm(accession="A" * 17).encode(), "AE", "102", "not a DICOM SH"),
    ("not UTF-8", orm().replace("Doe", "D\xf6e").encode("latin-1"), "AE", "102", "not UTF-8"),
    ("no control id", orm(control="").encode(), "AE", "101", "MSH-10"),
]


def test_malformed_messages_get_ae_or_ar_and_the_next_message_is_read(
    node: tuple[MllpListener, Store, Settings],
) -> None:
    listener, store, _ = node
    with MLLPClient("127.0.0.1", listener.port) as client:
        for what, data, code, error, reason in MALFORMED:
            ack = answer(client, data)
            got, _, text = msa(ack)
            assert (got, error_code(ack)) == (code, error), (what, text)
            assert reason in text, (what, text)
        assert orders(store) == []
        assert msa(answer(client, orm()))[0] == "AA"
    assert [o.accession_number for o in orders(store)] == ["ACC1"]


def test_latin1_declared_in_msh18_is_read(node: tuple[MllpListener, Store, Settings]) -> None:
    listener, store, _ = node
    message = orm().replace("|P|2.3", "|P|2.3||||||8859/1", 1).replace("Doe", "D\xf6e")
    with MLLPClient("127.0.0.1", listener.port) as client:
        assert msa(answer(client, message.encode("latin-1")))[0] == "AA"
    assert orders(store)[0].accession_number == "ACC1"


def test_segments_ended_by_lf_or_crlf_are_read(node: tuple[MllpListener, Store, Settings]) -> None:
    listener, store, _ = node
    with MLLPClient("127.0.0.1", listener.port) as client:
        assert msa(answer(client, orm().replace("\r", "\n")))[0] == "AA"
        assert msa(answer(client, omi().replace("\r", "\r\n")))[0] == "AA"
    assert [o.accession_number for o in orders(store)] == ["ACC1", "ACC2"]


def test_a_frame_cut_short_by_the_next_one_is_answered_and_the_next_is_read(
    node: tuple[MllpListener, Store, Settings],
) -> None:
    listener, store, _ = node
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        sock.sendall(b"junk before a frame" + SB + orm(control="CUT").encode()[:40] + SB + orm().encode() + EB + CR)
        data = b""
        while data.count(EB) < 2:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    first, second = (hl7.parse(part.strip(SB + CR).decode()) for part in data.split(EB)[:2])
    assert msa(first)[0] == "AR" and "without its end block" in msa(first)[2]
    assert msa(second)[:2] == ("AA", "MSG1")
    assert len(orders(store)) == 1


def test_the_fetch_stage_gets_the_order_when_its_source_is_configured(tmp_path: Path) -> None:
    """With a [[sources]] entry of the rule's name, an order becomes one fetch request, once."""
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": url},
        hl7={"enabled": True, "host": "127.0.0.1", "port": 0, "rules": RULES},
        sources=[{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}],
    )
    store = Store(url)
    listener = make_listener(store, settings)
    listener.start()
    try:
        with MLLPClient("127.0.0.1", listener.port) as client:
            text = msa(answer(client, omi(tq1="S")))[2]
            answer(client, omi(control="MSG2b"))  # the same order again
        assert "pending" not in text
        with store.session() as s:
            [request] = s.scalars(select(FetchRequest)).all()
            assert (request.source, request.identifiers["accession_number"]) == ("pacs", "ACC2")
            assert request.priority == Priority.HIGH and request.wait_until is not None
            [order] = s.scalars(select(Hl7Order)).all()
            assert (order.state, order.detail) == (OrderState.REQUESTED, f"fetch request {request.id}")
    finally:
        listener.stop()
        store.dispose()


def test_a_database_failure_answers_ae_so_the_sender_retries(node: tuple[MllpListener, Store, Settings]) -> None:
    listener, store, _ = node
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE hl7_order")
    with MLLPClient("127.0.0.1", listener.port) as client:
        ack = answer(client, orm())
        assert (msa(ack)[0], error_code(ack)) == ("AE", "207")
        assert "send it again" in msa(ack)[2]
        assert msa(answer(client, orm(code="MRKNEE")))[0] == "AA"  # the listener goes on


def test_hl7_settings_refuse_what_cannot_work(tmp_path: Path) -> None:
    cfg = tmp_path / "dxnode.toml"
    for body, words in [
        ('[[hl7.rules]]\nsource = "pacs"', "give procedure_codes or modalities"),
        ('[[hl7.destinations]]\nname = "ris"\nhost = "ris"', "needs host and port"),
        ('[[hl7.destinations]]\nname = "f"\nkind = "fhir"\nurl = "ftp://x"', "url must be an http(s) URL"),
        (
            '[[hl7.destinations]]\nname = "f"\nkind = "fhir"\nurl = "http://fhir.example/r4"\nsecret_env = "T"',
            "plain http",
        ),
    ]:
        cfg.write_text(body + "\n")
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_settings(cfg)


def test_connections_over_max_connections_are_closed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    settings = Settings(database={"url": url}, hl7={"host": "127.0.0.1", "port": 0, "max_connections": 1})
    store = Store(url)
    listener = make_listener(store, settings)
    listener.start()
    try:
        with MLLPClient("127.0.0.1", listener.port) as first:
            assert msa(answer(first, orm(code="MRKNEE")))[0] == "AA"
            with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as second:
                assert second.recv(10) == b""  # closed at once
            assert msa(answer(first, orm(code="MRKNEE", control="M2")))[0] == "AA"
    finally:
        listener.stop()
        store.dispose()

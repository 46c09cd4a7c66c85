"""The receive path's short transaction for later instances of a known series keeps the rows exact."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeproc import InProcessNode
from pydicom.uid import generate_uid
from sqlalchemy import delete, select
from test_scp import send_one, small_ct

from dxnode.store import Series, Study


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[InProcessNode]:
    n = InProcessNode(tmp_path, url=db_url)
    yield n
    n.stop()


def _study(node: InProcessNode, uid: str) -> Study:
    with node.store.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert study is not None
        return study


def test_later_instances_fill_the_study_row_and_record_size_and_hash(node: InProcessNode) -> None:
    study, series = generate_uid(), generate_uid()
    first = small_ct(study, series, 0)
    del first.PatientName
    assert send_one(node.port, first) == 0
    assert send_one(node.port, small_ct(study, series, 1)) == 0  # brings the patient name
    other = small_ct(study, series, 2)
    other.Modality = "OT"
    assert send_one(node.port, other) == 0
    assert send_one(node.port, small_ct(study, series, 3)) == 0  # nothing new: the short path
    row = _study(node, study)
    assert row.num_instances == 4 and row.patient_name == "Doe^Jane" and row.modalities == "CT\\OT"
    for inst in node.instances().values():
        data = (node.settings.data_dir / inst.file_path).read_bytes()
        assert inst.size_bytes == len(data) and inst.sha256 == hashlib.sha256(data).hexdigest()
        assert data[128:132] == b"DICM"


def test_duplicate_in_a_known_series_is_counted_and_keeps_the_file(node: InProcessNode) -> None:
    study, series = generate_uid(), generate_uid()
    a, b = small_ct(study, series, 0), small_ct(study, series, 1)
    assert send_one(node.port, a) == 0 and send_one(node.port, b) == 0
    path = node.settings.data_dir / node.instances()[b.SOPInstanceUID].file_path
    before = path.read_bytes()
    assert send_one(node.port, b) == 0
    assert node.instances()[b.SOPInstanceUID].duplicates == 1
    assert _study(node, study).num_instances == 2
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.tmp"))


def test_study_deleted_between_instances_is_recreated(node: InProcessNode) -> None:
    study, series = generate_uid(), generate_uid()
    assert send_one(node.port, small_ct(study, series, 0)) == 0
    with node.store.session() as s:  # e.g. an administrator's purge: series and instances go with it
        s.execute(delete(Study).where(Study.study_instance_uid == study))
        s.commit()
    assert send_one(node.port, small_ct(study, series, 1)) == 0
    assert _study(node, study).num_instances == 1
    with node.store.session() as s:
        assert s.scalar(select(Series.id).where(Series.series_instance_uid == series)) is not None
    assert len(node.instances()) == 1

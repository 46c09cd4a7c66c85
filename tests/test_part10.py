"""The receiver's own file header encoder against pydicom's (they must give the same bytes)."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta

from dxnode.receive.part10 import file_header


@pytest.mark.parametrize("uid_length", [20, 21, 63, 64])  # even and odd lengths: UI values are padded with NUL
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_file_header_is_byte_for_byte_what_pydicom_writes(uid_length: int, syntax: str) -> None:
    instance = (generate_uid("1.2.826.0.1.3680043.8.498.") + "1" * 64)[:uid_length].rstrip(".")
    meta = create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=instance, transfer_syntax=syntax)
    assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID
    assert meta.ImplementationVersionName == PYNETDICOM_IMPLEMENTATION_VERSION
    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta)  # type: ignore[arg-type]
    assert file_header(CTImageStorage, instance, syntax) == expected.getvalue()


def test_file_header_reads_back_with_pydicom() -> None:
    instance = generate_uid()
    ds = pydicom.dcmread(BytesIO(file_header(CTImageStorage, instance, ExplicitVRLittleEndian)), force=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID == instance
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (
        ds.file_meta.FileMetaInformationGroupLength
        == len(file_header(CTImageStorage, instance, "1.2.840.10008.1.2.1")) - 144
    )

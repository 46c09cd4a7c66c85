"""UID and AE-title validation: what may name a file or folder, and what may not."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from dxnode.uids import is_valid_ae_title, is_valid_uid, safe_component

VALID = ["0", "1.2", "1.2.840.10008.1.2.4.50", "2.25.0", "1.0.0.1", "1." + "2" * 62, generate_uid()]
INVALID = [
    "",
    ".",
    "1.",
    ".1",
    "1..2",
    "01.2",
    "1.02",
    "1.2a",
    "1.2 ",
    " 1.2",
    "1.2\x00",
    "1.2/3",
    "1.2\\3",
    "../../x",
    "..",
    "1/../..",
    "1.2.3\n",
    "-1.2",
    "1,2",
    "1." + "2" * 63,
    "１.２",  # fullwidth digits are not DICOM digits
]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids_pass(uid: str) -> None:
    assert is_valid_uid(uid)
    assert safe_component(uid) == uid


@pytest.mark.parametrize("uid", INVALID)
def test_invalid_uids_fail_and_never_name_a_path(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        safe_component(uid)


@pytest.mark.parametrize("value", [None, 1.2, b"1.2", ["1.2"]])
def test_non_strings_are_not_uids(value: object) -> None:
    assert not is_valid_uid(value)
    with pytest.raises(ValueError):
        safe_component(value)


def test_64_characters_is_the_limit() -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64 and is_valid_uid(uid) and not is_valid_uid(uid + "2")


def test_error_message_is_bounded() -> None:
    with pytest.raises(ValueError) as info:
        safe_component("x" * 10_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("title", ["DXNODE", "A", "CT 1", "  PACS  ", "X" * 16, "MY-AE_1.2"])
def test_valid_ae_titles(title: str) -> None:
    assert is_valid_ae_title(title)


@pytest.mark.parametrize("title", ["", "   ", "X" * 17, "A\\B", "A\x00", "A\nB", "É", None, 5])
def test_invalid_ae_titles(title: object) -> None:
    assert not is_valid_ae_title(title)

"""The SR's image library: headers without the TID 1603/1604 attributes reach highdicom as a view, unpatched."""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.data import get_testdata_file

from dxnode.outputs.sr import library_view


def _dx(**attrs: object) -> pydicom.Dataset:
    """A DX header (CT_small's pixels relabelled), with attributes set (None deletes one)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.Modality = "DX"
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _descriptor_codes(ds: pydicom.Dataset) -> set[str]:
    entry = hd.sr.ImageLibraryEntryDescriptors(ds)
    return {str(item.ConceptNameCodeSequence[0].CodeValue) for item in entry}


def test_radiograph_without_imager_pixel_spacing_gets_the_tid_1602_descriptors_only() -> None:
    sparse = _dx(ImagerPixelSpacing=None, PatientOrientation=["L", "F"])
    view = library_view(sparse)
    codes = _descriptor_codes(view)
    assert {"121139", "110910", "110911"} <= codes  # Modality, Pixel Data Rows / Columns (TID 1602)
    assert "111044" not in codes  # Patient Orientation Row (TID 1603): not had without Imager Pixel Spacing
    assert sparse.Modality == "DX" and "ImagerPixelSpacing" not in sparse  # the header itself is untouched


def test_complete_radiograph_is_handed_over_as_is_with_its_projection_descriptors() -> None:
    complete = _dx(ImagerPixelSpacing=[0.1, 0.1], PatientOrientation=["L", "F"])
    assert library_view(complete) is complete
    assert "111044" in _descriptor_codes(complete)

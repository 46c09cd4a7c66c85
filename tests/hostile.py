"""A corpus of hostile DICOM instances, made from pydicom's bundled files by the tests themselves.

Each case is one file with its own SOP Instance UID. Groups of cases share a study (one job per
group), so the node's job for that group must survive every case in it. `benign` cases must be
analysed and reported (character sets, missing Type 2 attributes, over-long values); the others
must be refused at C-STORE or end with an instance outcome that says why.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

SOURCES = {
    "native": "CT_small.dcm",
    "rle": "MR_small_RLE.dcm",
    "j2k": "MR_small_jp2klossless.dcm",
    "jpeg": "SC_rgb_jpeg_dcmtk.dcm",
    "jpegls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg_lossless": "JPGExtended.dcm",
}


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # cases of a group share a study
    path: Path
    sop_instance_uid: str
    benign: bool = False  # must be analysed (done), with an SR and SC
    raw_upload_only: bool = False  # not readable by DCMTK: only uploaded, never sent


def raw(ds: Dataset, keyword_or_tag: str | int, vr: str, value: bytes | int) -> None:
    """Set an element to bytes written as they are (values pydicom would refuse to make)."""
    tag = pydicom.datadict.tag_for_keyword(keyword_or_tag) if isinstance(keyword_or_tag, str) else keyword_or_tag
    ds[tag] = DataElement(tag, vr, value)


def frames_of(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def with_frame(ds: Dataset, frame: bytes) -> None:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = 1


def patch_j2k_siz(frame: bytes, width: int, height: int) -> bytes:
    at = frame.find(b"\xff\x4f\xff\x51") + 8
    return frame[:at] + struct.pack(">II", width, height) + frame[at + 8 :]


def patch_jpeg_sof(frame: bytes, width: int, height: int) -> bytes:
    pos = 2
    while pos < len(frame):
        marker = frame[pos + 1]
        (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            return frame[: pos + 5] + struct.pack(">HH", height, width) + frame[pos + 9 :]
        pos += 2 + length
    raise ValueError("no SOF")


def drop(*keywords: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for k in keywords:
            if k in ds:
                del ds[k]

    return mutate


def setattrs(**values: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for k, v in values.items():
            setattr(ds, k, v)

    return mutate


def raws(**values: tuple[str, bytes | int]) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for k, (vr, v) in values.items():
            raw(ds, k, vr, v)

    return mutate


def rle_bad_header(ds: Dataset) -> None:
    frame = frames_of(ds)[0]
    with_frame(ds, struct.pack("<16I", 15, *([1 << 30] * 15)) + frame[64:])


def rle_truncated(ds: Dataset) -> None:
    frame = frames_of(ds)[0]
    with_frame(ds, frame[: len(frame) // 3])


def j2k_siz(width: int, height: int) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        with_frame(ds, patch_j2k_siz(frames_of(ds)[0], width, height))

    return mutate


def jpeg_sof(width: int, height: int) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        with_frame(ds, patch_jpeg_sof(frames_of(ds)[0], width, height))

    return mutate


def garbage_frame(ds: Dataset) -> None:
    with_frame(ds, bytes(range(256)) * 8)


def truncated_frame(ds: Dataset) -> None:
    frame = frames_of(ds)[0]
    with_frame(ds, frame[: len(frame) // 4] + b"\xff\xd9")


def pdf(ds: Dataset) -> None:
    for k in [e.keyword for e in ds if e.tag.group in (0x0028, 0x7FE0) and e.keyword]:
        del ds[k]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.Modality = "DOC"


def no_pixels(ds: Dataset) -> None:
    del ds.PixelData


def voi_lut_garbage(ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [0, 0, 0]
    raw(item, "LUTData", "OW", b"\x00\x01")
    ds.VOILUTSequence = [item]
    for k in ("WindowCenter", "WindowWidth"):
        if k in ds:
            del ds[k]


def modality_lut_garbage(ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "HU"
    raw(item, "LUTData", "OW", b"\x00\x01")
    ds.ModalityLUTSequence = [item]
    for k in ("RescaleSlope", "RescaleIntercept"):
        if k in ds:
            del ds[k]


# Decoders fill a JPEG scan that ends early (as viewers do): an image, analysed without complaint, is fine.
TOLERATED = {"jpeg_truncated"}

# A Korean name whose Hangul sits between SO and SI (0x0e, 0x0f), as a malformed IR 149 writer sends it.
IR149_SO_SI_NAME = b"Hong^Gildong=\x1b$)C\x0e\xc8\xab\x0f^\x0e\xb1\xe6\xb5\xbf\x0f"

TYPE2 = ("PatientBirthDate", "PatientSex", "StudyID", "StudyTime", "AccessionNumber", "ReferringPhysicianName")

# (name, group, source, mutate, benign)
SPECS: list[tuple[str, str, str, Callable[[Dataset], None], bool]] = [
    # bad or absurd pixel attributes, native
    ("rows_zero", "pixel", "native", setattrs(Rows=0), False),
    ("columns_zero", "pixel", "native", setattrs(Columns=0), False),
    ("native_dimension_bomb", "pixel", "native", setattrs(Rows=65535, Columns=65535), False),
    ("frames_minus_5", "pixel", "native", raws(NumberOfFrames=("IS", b"-5")), False),
    ("frames_zero", "pixel", "native", raws(NumberOfFrames=("IS", b"0")), False),
    ("frames_text", "pixel", "native", raws(NumberOfFrames=("IS", b"-7")), False),  # patched to "ab" on disk
    ("frames_100000", "pixel", "native", raws(NumberOfFrames=("IS", b"100000")), False),
    ("samples_4", "pixel", "native", setattrs(SamplesPerPixel=4), False),
    ("bits_allocated_7", "pixel", "native", setattrs(BitsAllocated=7), False),
    ("bits_stored_over_allocated", "pixel", "native", setattrs(BitsStored=40), False),
    ("bits_allocated_64_bomb", "pixel", "native", setattrs(BitsAllocated=64, Rows=30000, Columns=30000), False),
    ("pixel_data_short", "pixel", "native", lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]), False),
    ("photometric_unknown", "pixel", "native", setattrs(PhotometricInterpretation="FOO"), False),
    ("rows_wrong_vr", "pixel", "native", raws(Rows=("LO", b"abc ")), False),
    ("no_pixel_data", "pixel", "native", no_pixels, False),
    ("rows_fewer_than_pixel_data", "pixel", "MR_small.dcm", setattrs(Rows=15), False),  # fuzz: to_tensor failed
    # RLE
    ("rle_dimension_bomb", "rle", "rle", setattrs(Rows=65535, Columns=65535), False),
    ("rle_frames_bomb", "rle", "rle", raws(NumberOfFrames=("IS", b"65535")), False),
    ("rle_bad_segment_header", "rle", "rle", rle_bad_header, False),
    ("rle_truncated_segments", "rle", "rle", rle_truncated, False),
    ("rle_rows_disagree", "rle", "rle", setattrs(Rows=512, Columns=512), False),
    ("rle_rows_fewer_than_segments", "rle", "rle", setattrs(Rows=32), False),  # fuzz: the Rust decoder panicked
    # JPEG 2000
    ("j2k_codestream_bomb", "j2k", "j2k", j2k_siz(60000, 60000), False),
    ("j2k_codestream_smaller", "j2k", "j2k", j2k_siz(16, 16), False),
    ("j2k_dataset_bomb", "j2k", "j2k", setattrs(Rows=65535, Columns=65535), False),
    ("j2k_samples_disagree", "j2k", "j2k", setattrs(SamplesPerPixel=3, PhotometricInterpretation="RGB"), False),
    ("j2k_garbage", "j2k", "j2k", garbage_frame, False),
    ("j2k_truncated", "j2k", "j2k", truncated_frame, False),
    # JPEG, JPEG-LS
    ("jpeg_sof_bomb", "jpeg", "jpeg", jpeg_sof(65000, 65000), False),
    ("jpeg_dataset_bomb", "jpeg", "jpeg", setattrs(Rows=65535, Columns=65535), False),
    ("jpeg_garbage", "jpeg", "jpeg", garbage_frame, False),
    ("jpeg_truncated", "jpeg", "jpeg", truncated_frame, False),
    ("jpegls_sof_bomb", "jpeg", "jpegls", jpeg_sof(60000, 60000), False),
    ("jpeg_lossless_dataset_bomb", "jpeg", "jpeg_lossless", setattrs(Rows=40000, Columns=40000), False),
    # NaN, inf and absurd LUT values
    ("window_center_nan", "lut", "native", raws(WindowCenter=("DS", b"NaN"), WindowWidth=("DS", b"400")), False),
    ("window_width_inf", "lut", "native", raws(WindowCenter=("DS", b"40"), WindowWidth=("DS", b"inf")), False),
    ("window_center_1e308", "lut", "native", raws(WindowCenter=("DS", b"1e308"), WindowWidth=("DS", b"1e308")), False),
    ("window_width_zero", "lut", "native", raws(WindowCenter=("DS", b"40"), WindowWidth=("DS", b"0")), False),
    ("window_width_negative", "lut", "native", raws(WindowCenter=("DS", b"40"), WindowWidth=("DS", b"-400")), False),
    ("window_text", "lut", "native", raws(WindowCenter=("DS", b"777 "), WindowWidth=("DS", b"888 ")), False),
    ("rescale_slope_nan", "lut", "native", raws(RescaleSlope=("DS", b"NaN")), False),
    ("rescale_slope_inf", "lut", "native", raws(RescaleSlope=("DS", b"-inf")), False),
    ("rescale_slope_zero", "lut", "native", raws(RescaleSlope=("DS", b"0")), False),
    ("rescale_intercept_1e308", "lut", "native", raws(RescaleIntercept=("DS", b"1e308")), False),
    ("voi_lut_garbage", "lut", "native", voi_lut_garbage, False),
    ("modality_lut_garbage", "lut", "native", modality_lut_garbage, False),
    # character sets, missing Type 2 attributes, over-long and invalid values (must be reported)
    (
        "charset_latin1",
        "cs-latin1",
        "native",
        setattrs(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen"),
        True,
    ),
    (
        "charset_utf8",
        "cs-utf8",
        "native",
        setattrs(SpecificCharacterSet="ISO_IR 192", PatientName="Δημήτρης^Ωμέγα"),
        True,
    ),
    ("charset_gb18030", "cs-gb18030", "native", setattrs(SpecificCharacterSet="GB18030", PatientName="王^小明"), True),
    (
        "charset_iso2022_ir87",
        "cs-ir87",
        "native",
        setattrs(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう"),
        True,
    ),
    ("charset_unknown", "cs-unknown", "native", setattrs(SpecificCharacterSet="ISO_IR 999"), True),
    (
        "charset_bad_utf8_bytes",
        "cs-badutf8",
        "native",
        lambda ds: (
            setattr(ds, "SpecificCharacterSet", "ISO_IR 192"),
            raw(ds, "PatientName", "PN", b"Bad\xff\xfe^Bytes"),
        ),
        True,
    ),
    ("no_type2_attributes", "type2", "native", drop(*TYPE2), True),
    ("patient_name_20k", "long", "native", setattrs(PatientName="A" * 20000), True),
    (
        "study_description_and_accession_long",
        "long",
        "native",
        setattrs(StudyDescription="B" * 3000, AccessionNumber="C" * 100),
        True,
    ),
    (
        "invalid_date_time_sex",
        "long",
        "native",
        raws(StudyDate=("DA", b"notadate"), StudyTime=("TM", b"99:99"), PatientSex=("CS", b"X ")),
        True,
    ),
    # issue 24: a date not in the calendar failed the job; a 68-character PN group and SO/SI bytes failed dciodvfy
    (
        "dates_not_in_calendar",
        "calendar",
        "native",
        raws(PatientBirthDate=("DA", b"20251399"), StudyDate=("DA", b"20241331"), StudyTime=("TM", b"256100")),
        True,
    ),
    ("pn_group_68_characters", "calendar", "native", raws(ReferringPhysicianName=("PN", b"R" * 68 + b"^Given")), True),
    (  # fuzz: groups within 64 bytes each, 160 in all: dciodvfy reads a UTF-8 PN whole
        "pn_groups_160_bytes",
        "calendar",
        "native",
        raws(PatientName=("PN", b"X" * 30 + b"=" + b"Y" * 64 + b"=" + b"Z" * 64)),
        True,
    ),
    (
        "iso2022_ir149_so_si",
        "cs-ir149",
        "native",
        lambda ds: (
            setattr(ds, "SpecificCharacterSet", ["", "ISO 2022 IR 149"]),
            raw(ds, "PatientName", "PN", IR149_SO_SI_NAME),
        ),
        True,
    ),
    ("accession_two_values", "long", "native", raws(AccessionNumber=("SH", b"ACC1\\ACC2 ")), True),  # fuzz: VM 2
    ("laterality_not_r_or_l", "long", "native", raws(Laterality=("CS", b"LEFT")), True),  # fuzz: SC lost Laterality
    (  # fuzz: a standard attribute under another VR reached highdicom (DA) and dciodvfy (PN)
        "standard_attributes_wrong_vr",
        "wrong-vr",
        "native",
        raws(StudyDate=("SH", b"\xf4\xfe\x8f\xaf"), PatientName=("LO", b"\xc8\xb0"), StudyTime=("TM", b"235960")),
        True,
    ),
    (  # fuzz: frames of a single-frame SOP class were referenced by number (dciodvfy)
        "frames_of_a_single_frame_class",
        "wrong-vr",
        "MR_small.dcm",
        raws(Rows=("US", 32), NumberOfFrames=("IS", b"2 ")),
        True,
    ),
    ("body_part_unknown", "long", "native", raws(BodyPartExamined=("CS", b"L" * 16)), True),  # fuzz: no Laterality
    (  # fuzz geometry mutations: geometry the SR's image library and the SC read as numbers
        "geometry_not_numbers",
        "wrong-vr",
        "native",
        raws(
            ImageOrientationPatient=("DS", b"NaN\\1\\0\\0\\1\\0 "),
            PixelSpacing=("DS", b"0\\0 "),
            SliceThickness=("DS", b"-inf"),
            PatientOrientation=("CS", b"X\\Y "),
        ),
        True,
    ),
    # wrong VRs and missing UIDs (refused at receive)
    ("study_uid_vr_ul", "vr", "native", raws(StudyInstanceUID=("UL", 7)), False),
    ("no_sop_instance_uid", "vr", "native", drop("SOPInstanceUID"), False),
    ("series_uid_too_long", "vr", "native", setattrs(SeriesInstanceUID="1." + "2" * 70), False),
    # non-image SOP classes
    ("encapsulated_pdf", "nonimage", "native", pdf, False),
    ("rt_plan", "nonimage", "rtplan.dcm", lambda ds: None, False),
    ("structured_report", "nonimage", "reportsi.dcm", lambda ds: None, False),
]


BYTE_PATCHES = {
    "frames_text": [(b"\x28\x00\x08\x00IS\x02\x00-7", b"\x28\x00\x08\x00IS\x02\x00ab")],
    "window_text": [(b"DS\x04\x00777 ", b"DS\x04\x00abc "), (b"DS\x04\x00888 ", b"DS\x04\x00def ")],
}


def deflate_bomb(folder: Path, study: str, inflated_mb: int) -> tuple[Path, str]:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to about inflated_mb MB.

    A private OB element (0009,1010) of zeros sits between groups 0008 and 0010; the file stays small.
    """
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag.group < 0x0009 else high).add(elem)
    parts = []
    for part in (low, high):
        body = DicomBytesIO()
        body.is_little_endian, body.is_implicit_VR = True, False
        pydicom.filewriter.write_dataset(body, part)
        parts.append(body.getvalue())
    meta = BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    private = struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 6) + b"BOMB  "
    private += struct.pack("<HH", 0x0009, 0x1010) + b"OB\x00\x00" + struct.pack("<I", inflated_mb << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(parts[0] + private)]
    zeros = b"\x00" * (1 << 20)
    out += [comp.compress(zeros) for _ in range(inflated_mb)]
    out += [comp.compress(parts[1]), comp.flush()]
    path = folder / "deflate_bomb.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(out))
    return path, uid


def build_corpus(folder: Path, deflate_bomb_mb: int) -> list[Case]:
    """Write every case under folder; returns them (at least 50 sendable over C-STORE)."""
    folder.mkdir(parents=True, exist_ok=True)
    studies: dict[str, str] = {}
    cases = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, group, source, mutate, benign in SPECS:
            ds = pydicom.dcmread(get_testdata_file(SOURCES.get(source, source)))
            study = studies.setdefault(group, generate_uid())
            uid = generate_uid()
            series = studies.setdefault(group + "/series", generate_uid())
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.PatientID = f"HOSTILE-{group}"[:64]
            mutate(ds)
            path = folder / f"{name}.dcm"
            ds.save_as(path)
            if name in BYTE_PATCHES:  # values pydicom cannot even hold
                data = path.read_bytes()
                for old, new in BYTE_PATCHES[name]:
                    assert old in data, (name, old)
                    data = data.replace(old, new, 1)
                path.write_bytes(data)
            cases.append(Case(name, group, path, uid, benign))
        # Deflate: a bomb over [node] max_instance_mb, and a benign deflated image.
        path, uid = deflate_bomb(folder, studies.setdefault("deflate", generate_uid()), deflate_bomb_mb)
        cases.append(Case("deflate_bomb", "deflate", path, uid))
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        uid = generate_uid()
        ds.StudyInstanceUID, ds.SOPInstanceUID = studies["deflate"], uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.WindowCenter, ds.WindowWidth = "NaN", "NaN"
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        path = folder / "deflate_nan_window.dcm"
        ds.save_as(path)
        cases.append(Case("deflate_nan_window", "deflate", path, uid))
        # Files no DICOM reader can finish: uploaded only.
        whole = (folder / "rows_zero.dcm").read_bytes()
        for name, data in {
            "truncated_in_header": whole[:300],
            "truncated_in_pixels": whole[: len(whole) - 20000],
            "deflate_garbage": (folder / "deflate_nan_window.dcm").read_bytes()[:400] + b"\x13\x37" * 500,
            "not_dicom": b"hello" * 100,
        }.items():
            (folder / f"{name}.dcm").write_bytes(data)
            cases.append(Case(name, "upload", folder / f"{name}.dcm", "", raw_upload_only=True))
    return cases

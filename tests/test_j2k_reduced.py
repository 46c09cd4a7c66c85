"""JPEG 2000 decoded at a reduced resolution level: same model output as full size, same pixel chain."""

from __future__ import annotations

from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from dicom_checks import dciodvfy_errors

from dxnode.analysis.streaming import analyze_study
from dxnode.config import ModelSettings, PipelineSettings, Settings
from dxnode.inference.bundle import demo_network, write_bundle
from dxnode.model import Classifier, load_classifier
from dxnode.outputs.report import write_outputs
from dxnode.pipeline import Preprocessing, read_frames, to_tensor
from dxnode.pixels import j2k

DATA = Path(data_store.__file__).parent / "data"
RADIOGRAPHS = ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm"]  # real CRs, MONOCHROME1
FULL = PipelineSettings(decode_max_side=0)
REDUCED = PipelineSettings()


@pytest.fixture(scope="module")
def demo() -> Classifier:
    net, manifest = demo_network()
    return Classifier(net, manifest, torch.device("cpu"), batch_size=8)


def test_openjpeg_library_loads() -> None:
    assert j2k.unavailable_reason() is None


def _shrink(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(image[..., 0]))[None, None]
    return F.interpolate(t, size=shape[:2], mode="area")[0, 0].numpy()


@pytest.mark.parametrize("name", RADIOGRAPHS)
@pytest.mark.parametrize("own_window", [True, False], ids=["dataset-window", "percentile-window"])
def test_reduced_decode_gives_the_full_resolution_probabilities(name: str, own_window: bool, demo: Classifier) -> None:
    ds = pydicom.dcmread(DATA / name)
    if not own_window:
        del ds.WindowCenter, ds.WindowWidth
    prep = demo.manifest.preprocessing
    (full,) = read_frames(ds, FULL, prep)
    (reduced,) = read_frames(ds, REDUCED, prep)
    assert full.image.shape[:2] == (ds.Rows, ds.Columns)
    assert 512 < max(reduced.image.shape[:2]) <= 1024  # one level down
    # MONOCHROME1 inverted, LUT and window applied alike: the reduced image is the full one, smaller.
    assert np.abs(_shrink(full.image, reduced.image.shape) - reduced.image[..., 0]).mean() < 0.01
    assert full.window is not None and reduced.window is not None
    if own_window:
        assert full.window == reduced.window
    else:  # percentiles of the smaller image: within 2% of the width
        assert abs(full.window[0] - reduced.window[0]) < 0.02 * full.window[1]
        assert abs(full.window[1] - reduced.window[1]) < 0.02 * full.window[1]
    x_full, x_reduced = to_tensor(full, prep), to_tensor(reduced, prep)
    assert np.abs(x_full - x_reduced).mean() < 0.02
    p_full, p_reduced = demo.predict(np.stack([x_full, x_reduced]))
    assert np.abs(p_full - p_reduced).max() < 0.01


def test_signed_ct_reduced_keeps_hounsfield_units() -> None:
    lung = PipelineSettings(decode_max_side=256, windows=[{"modality": "CT", "center": -600, "width": 1500}])
    prep = Preprocessing()
    (full,) = read_frames(DATA / "693_J2KR.dcm", FULL.model_copy(update={"windows": lung.windows}), prep)
    (reduced,) = read_frames(DATA / "693_J2KR.dcm", lung, prep)
    assert pydicom.dcmread(DATA / "693_J2KR.dcm", stop_before_pixels=True).PixelRepresentation == 1
    assert reduced.image.shape[:2] == (256, 256)
    assert np.abs(_shrink(full.image, reduced.image.shape) - reduced.image[..., 0]).mean() < 0.02


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("US1_J2KR.dcm", REDUCED),  # colour (YBR_RCT): full size through pydicom
        ("693_J2KR.dcm", REDUCED),  # 512x512: no larger than decode_max_side
        ("RG3_J2KR.dcm", FULL),  # decode_max_side = 0
        ("RG3_UNCR.dcm", REDUCED),  # not JPEG 2000
    ],
)
def test_full_size_where_reduction_does_not_apply(name: str, settings: PipelineSettings) -> None:
    ds = pydicom.dcmread(DATA / name, stop_before_pixels=True)
    (frame,) = read_frames(DATA / name, settings, Preprocessing())
    assert frame.image.shape[:2] == (ds.Rows, ds.Columns)


def test_multiframe_j2k_frames_reduced_one_by_one(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "RG3_UNCR.dcm")
    a = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.compress(pydicom.uid.JPEG2000Lossless, np.stack([a, a[::-1].copy()]))
    ds.save_as(tmp_path / "mf.dcm")
    prep = Preprocessing()
    full = read_frames(tmp_path / "mf.dcm", FULL, prep)
    reduced = read_frames(tmp_path / "mf.dcm", REDUCED, prep)
    assert [f.frame_index for f in reduced] == [0, 1] and reduced[0].image.shape[:2] == (880, 880)
    for f, r in zip(full, reduced, strict=True):
        assert np.abs(_shrink(f.image, r.image.shape) - r.image[..., 0]).mean() < 0.01
    assert not np.allclose(reduced[0].image, reduced[1].image)


def test_heatmap_sc_from_a_reduced_decode_is_valid_and_references_the_source(tmp_path: Path) -> None:
    torch.manual_seed(5)
    import torchvision

    write_bundle(
        tmp_path / "b",
        torchvision.models.resnet18(num_classes=2).state_dict(),
        name="chest-net",
        version="1.0",
        labels=["Effusion", "Nodule"],
        task="multilabel",
        thresholds=[0.5, 0.5],
        preprocessing=Preprocessing(input_size=64),
    )
    settings = Settings()
    src = DATA / "RG1_J2KR.dcm"
    source = pydicom.dcmread(src, stop_before_pixels=True)
    clf = load_classifier(ModelSettings(bundle=str(tmp_path / "b")))
    result = analyze_study(source.StudyInstanceUID, [(source.SOPInstanceUID, src)], clf, settings, "all")
    written = write_outputs(result, {source.SOPInstanceUID: src}, settings, tmp_path / "out")
    sc = [pydicom.dcmread(w.path) for w in written if w.kind == "sc"]
    assert len(sc) == 2
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
    for ds in sc:
        # [report] sc_max_side (1024) bounds the SC, caption panel included: the level-1 image
        # (978x921) is scaled down a little to leave room for the panel.
        assert max(ds.Rows, ds.Columns) <= 1024 and 850 < ds.Columns < 921
        assert "from the source's 1955x1841" in ds.DerivationDescription
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # sc_max_side = 0: the heatmap at the size it was drawn, the level-1 image; the caption panel adds rows
    unbounded = Settings(report={"sc_max_side": 0})
    for w in write_outputs(result, {source.SOPInstanceUID: src}, unbounded, tmp_path / "out0"):
        if w.kind == "sc":
            ds = pydicom.dcmread(w.path)
            assert ds.Columns == 921 and ds.Rows > 978
            assert dciodvfy_errors(w.path) == [], w.path


def test_malformed_encapsulation_falls_back_to_full_size_with_the_reason_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken Basic Offset Table (read_frames refuses it earlier; modality_values is also called directly):
    the reduced path logs why, once, and pydicom's decoder gives the error."""
    from dxnode.pipeline import PipelineError, j2k_reduce, modality_values

    ds = pydicom.dcmread(DATA / "RG1_J2KR.dcm")
    ds.PixelData = b"\x00\x00\x00\x00" + ds.PixelData[4:]
    with caplog.at_level("WARNING", logger="dxnode.pipeline"):
        for _ in range(2):
            with pytest.raises(PipelineError, match="cannot decode pixel data"):
                modality_values(ds, 1, reduce=j2k_reduce(REDUCED, Preprocessing()))
    lines = [r.getMessage() for r in caplog.records if "fell back to full size" in r.getMessage()]
    assert len(lines) == 1 and "ValueError" in lines[0], lines


def test_a_bug_on_the_reduced_path_is_not_hidden_as_a_full_size_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the header's failure modes fall back: an error of dxnode's own code fails the instance, naming it."""
    from dxnode.pipeline import PipelineError

    def broken(cs: bytes, level: int, threads: int) -> None:
        raise AttributeError("module 'dxnode.pixels.j2k' has no attribute 'opj_thing'")

    monkeypatch.setattr(j2k, "decode", broken)
    with pytest.raises(PipelineError, match=r"AttributeError: .*opj_thing"):
        read_frames(DATA / "RG1_J2KR.dcm", REDUCED, Preprocessing())
    assert read_frames(DATA / "RG1_J2KR.dcm", FULL, Preprocessing())  # the full-size path does not use it

"""The pixel chain against hand-computed values and pydicom's own conversions, on real files."""

from __future__ import annotations

from pathlib import Path

import data_store
import numpy as np
import pydicom
import pydicom.data
import pytest
from conftest import need_tool, run
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

from dxnode.config import PipelineSettings
from dxnode.pipeline import (
    PipelineError,
    Preprocessing,
    frame_indices,
    geometry,
    map_to_source,
    modality_values,
    read_frames,
    skip_reason,
    to_tensor,
)

DATA_STORE = Path(data_store.__file__).parent / "data"  # pydicom-data's files, on disk (never downloaded)
PREP = Preprocessing()
LUNG = PipelineSettings(windows=[{"modality": "CT", "center": -600, "width": 1500}])


def gray(frame) -> np.ndarray:  # type: ignore[no-untyped-def]
    return frame.image[..., 0]


def test_ct_rescale_intercept_then_lung_window_by_hand() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert (ds.RescaleIntercept, ds.RescaleSlope) == (-1024, 1)
    (frame,) = read_frames(ds, LUNG, PREP)
    hu = ds.pixel_array.astype(np.float64) * 1 - 1024
    c, w = -600 - 0.5, 1500 - 1  # PS3.3 C.11.2.1.2.1 (LINEAR)
    expected = np.clip((hu - c) / w + 0.5, 0, 1)
    np.testing.assert_allclose(gray(frame), expected, atol=1e-6)
    assert frame.window == (-600, 1500)
    assert frame.display.dtype == np.uint8 and frame.display.shape == (*ds.pixel_array.shape, 3)


def test_preset_beats_the_dataset_window_and_dataset_beats_auto() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    (own,) = read_frames(ds, PipelineSettings(), PREP)
    (preset,) = read_frames(ds, LUNG, PREP)
    assert own.window == (40, 400) and preset.window == (-600, 1500)
    del ds.WindowCenter, ds.WindowWidth
    (auto,) = read_frames(ds, PipelineSettings(), PREP)
    hu = ds.pixel_array - 1024.0
    lo, hi = np.percentile(hu, [0.5, 99.5])
    assert auto.window == pytest.approx(((lo + hi) / 2, hi - lo))


def test_monochrome1_cr_comes_out_inverted() -> None:
    ds = pydicom.dcmread(DATA_STORE / "RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    (frame,) = read_frames(ds, PipelineSettings(), Preprocessing())
    c, w = 15000 - 0.5, 30000 - 1
    windowed = np.clip((ds.pixel_array.astype(np.float64) - c) / w + 0.5, 0, 1)
    np.testing.assert_allclose(gray(frame), 1 - windowed, atol=1e-6)
    # High stored values (dense, e.g. bone, in MONOCHROME1) are dark on screen.
    assert frame.display[ds.pixel_array > np.percentile(ds.pixel_array, 99)].mean() < frame.display.mean()


def test_sigmoid_and_linear_exact_voi_functions() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, "SIGMOID"
    (frame,) = read_frames(ds, PipelineSettings(), PREP)
    hu = ds.pixel_array - 1024.0
    np.testing.assert_allclose(gray(frame), 1 / (1 + np.exp(-4 * (hu - 40) / 400)), atol=1e-6)
    ds.VOILUTFunction = "LINEAR_EXACT"
    (frame,) = read_frames(ds, PipelineSettings(), PREP)
    np.testing.assert_allclose(gray(frame), np.clip((hu - 40) / 400 + 0.5, 0, 1), atol=1e-6)


def test_voi_lut_sequence_and_modality_lut_sequence() -> None:
    ds = pydicom.dcmread(DATA_STORE / "vlut_04.dcm")
    (frame,) = read_frames(ds, PipelineSettings(), PREP)
    item = ds.VOILUTSequence[0]
    first, bits = int(item.LUTDescriptor[1]), int(item.LUTDescriptor[2])
    lut = np.asarray(item.LUTData, dtype=np.float64)
    idx = np.clip(ds.pixel_array.astype(np.int64) - first, 0, len(lut) - 1)
    np.testing.assert_allclose(gray(frame), lut[idx] / (2**bits - 1), atol=1e-6)
    ds = pydicom.dcmread(DATA_STORE / "mlut_18.dcm")
    ((_, values),) = modality_values(ds, 1)
    item = ds.ModalityLUTSequence[0]
    lut = np.asarray(item.LUTData)
    idx = np.clip(ds.pixel_array.astype(np.int64) - int(item.LUTDescriptor[1]), 0, len(lut) - 1)
    np.testing.assert_array_equal(values, lut[idx])


def test_ybr_full_422_jpeg_comes_out_rgb_like_pydicom() -> None:
    path = get_testdata_file("SC_rgb_dcmtk_+eb+cy+np.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    (frame,) = read_frames(ds, PipelineSettings(), PREP)
    expected = convert_color_space(pixel_array(path, raw=True), "YBR_FULL", "RGB")
    assert np.abs(frame.display.astype(int) - expected.astype(int)).max() <= 1
    assert frame.display[5, 5].tolist() == [255, 0, 0] or frame.display[5, 5, 0] > 240  # the red band of the sample


def test_palette_color_comes_out_rgb_like_pydicom() -> None:
    ds = pydicom.dcmread(DATA_STORE / "OBXXXX1A.dcm")
    (frame,) = read_frames(ds, PipelineSettings(), PREP)
    rgb = apply_color_lut(ds.pixel_array, ds)
    scale = 255.0 if rgb.max() <= 255 else 65535.0
    np.testing.assert_allclose(frame.image, rgb / scale, atol=1e-6)


def test_multiframe_frames_are_evenly_spaced_and_capped() -> None:
    assert frame_indices(30, 4) == [0, 10, 19, 29]
    assert frame_indices(3, 8) == [0, 1, 2]
    frames = read_frames(get_testdata_file("examples_ybr_color.dcm"), PipelineSettings(max_frames=3), PREP)
    assert [f.frame_index for f in frames] == [0, 14, 29]
    every = read_frames(get_testdata_file("examples_ybr_color.dcm"), PipelineSettings(max_frames=30), PREP)
    for f in frames:  # decoding only the chosen frames gives the same pixels as decoding all
        np.testing.assert_array_equal(f.display, every[f.frame_index].display)


@pytest.mark.parametrize("resize", ["letterbox", "center_crop"])
def test_resize_geometry_round_trip(resize: str) -> None:
    prep = Preprocessing(input_size=64, resize=resize)
    g = geometry(100, 200, prep)
    frame_image = np.ones((100, 200, 3), dtype=np.float32)
    from dxnode.pipeline import Frame

    t = to_tensor(Frame(frame_image, (frame_image * 255).astype(np.uint8), 0), prep)
    assert t.shape == (3, 64, 64)
    assert isinstance(t, np.ndarray) and t.dtype == np.float32
    inside = t[0] * prep.std[0] + prep.mean[0]  # undo normalisation: 1 where the image is
    if resize == "letterbox":
        assert inside[g.top : g.top + g.resized_h, :].min() > 0.99 and inside[0, 0] == pytest.approx(0, abs=1e-6)
    else:
        assert inside.min() > 0.99
    back = map_to_source(inside, g)
    assert back.shape == (100, 200)
    assert back[10:90, 10:190].min() > 0.95 if resize == "letterbox" else back[:, 60:140].min() > 0.95


def _box(display: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PIL's exact area average of a display image down to shape: an independent reference."""
    return np.asarray(Image.fromarray(display).resize((shape[1], shape[0]), Image.Resampling.BOX)).astype(int)


@pytest.mark.parametrize(
    "path, settings, max_side, size",
    [
        (DATA_STORE / "RG1_UNCR.dcm", PipelineSettings(), 1024, (1024, 964)),  # 1955x1841 CR, MONOCHROME1
        (Path(get_testdata_file("examples_ybr_color.dcm")), PipelineSettings(max_frames=2), 160, (120, 160)),  # colour
        (Path(get_testdata_file("CT_small.dcm")), LUNG, 1024, (128, 128)),  # already small: as it is
    ],
)
def test_display_is_downsampled_to_display_max_side_and_the_model_image_is_not(
    path: Path, settings: PipelineSettings, max_side: int, size: tuple[int, int]
) -> None:
    full = read_frames(path, settings, PREP)
    small = read_frames(path, settings, PREP, display_max_side=max_side)
    for f, s in zip(full, small, strict=True):
        np.testing.assert_array_equal(s.image, f.image)  # the model input is unchanged
        assert s.image_shape == f.image_shape == f.display.shape[:2] == f.image.shape[:2]
        assert s.display.shape == (*size, 3) and s.display.dtype == np.uint8
        assert max(size) <= max_side
        # aspect kept: the longest side is max_side, the other within rounding of the source's ratio
        h, w = f.image_shape
        assert abs(size[0] / size[1] - h / w) <= 1 / min(size)
        if size == f.image_shape:
            np.testing.assert_array_equal(s.display, f.display)
        else:  # a weighted mean of the pixels under each display pixel, close to an exact area average
            assert np.abs(_box(f.display, s.display.shape) - s.display).mean() < 1.0
            assert abs(float(s.display.mean()) - float(f.display.mean())) < 0.5
        if f.display.shape[2] == 3 and (f.display[..., 0] == f.display[..., 2]).all():
            assert (s.display[..., 0] == s.display[..., 1]).all() and (s.display[..., 0] == s.display[..., 2]).all()
        assert s.without_image().image.size == 0 and s.without_image().image_shape == f.image_shape


@pytest.mark.parametrize("resize", ["letterbox", "center_crop"])
def test_a_map_onto_a_scaled_display_is_the_scaled_map_onto_the_source(resize: str) -> None:
    """The letterbox/crop is undone with the source's geometry, whatever size the display has."""
    prep = Preprocessing(input_size=64, resize=resize)
    g = geometry(300, 200, prep)
    yy, xx = np.mgrid[0:64, 0:64]
    inside = np.exp(-((yy - 40) ** 2 + (xx - 28) ** 2) / 60.0).astype(np.float32)  # a smooth, off-centre blob
    full = map_to_source(inside, g)
    small = map_to_source(inside, g, (150, 100))
    assert full.shape == (300, 200) and small.shape == (150, 100)
    # each display pixel covers 2x2 source pixels: the mean of those, within interpolation error
    pooled = full.reshape(150, 2, 100, 2).mean(axis=(1, 3))
    assert np.abs(pooled - small).max() < 0.02
    peak_full = np.array(np.unravel_index(int(full.argmax()), full.shape))
    peak_small = np.array(np.unravel_index(int(small.argmax()), small.shape))
    assert np.abs((peak_small + 0.5) * 2 - (peak_full + 0.5)).max() <= 2  # the same place, in source pixels


def test_png_and_jpeg_inputs(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.jpg")
    (png,) = read_frames(tmp_path / "x.png", PipelineSettings(), PREP)
    np.testing.assert_array_equal(png.display, rgb)
    (jpg,) = read_frames(tmp_path / "g.jpg", PipelineSettings(), PREP)
    assert jpg.display.shape == (40, 60, 3) and (jpg.display[..., 0] == jpg.display[..., 2]).all()
    (small,) = read_frames(tmp_path / "x.png", PipelineSettings(), PREP, display_max_side=30)
    assert small.display.shape == (20, 30, 3) and small.image_shape == (40, 60)
    np.testing.assert_array_equal(small.image, png.image)


def test_non_images_never_reach_the_decoder_and_rules_apply() -> None:
    sr = pydicom.dcmread(get_testdata_file("reportsi.dcm"))
    assert skip_reason(sr, PipelineSettings()) == "not an image: Structured Report"
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert skip_reason(ct, PipelineSettings()) is None
    assert "modality CT" in skip_reason(ct, PipelineSettings(modalities=["CR", "DX"]))
    assert "body part" in skip_reason(ct, PipelineSettings(body_parts=["CHEST"]))
    with pytest.raises(PipelineError, match="not an image: RT Plan"):
        read_frames(get_testdata_file("rtplan.dcm"), PipelineSettings(), PREP)


def test_corrupt_files_fail_with_a_specific_reason(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="cannot decode pixel data"):
        read_frames(get_testdata_file("MR_truncated.dcm"), PipelineSettings(), PREP)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 64 + b"not dicom at all")
    with pytest.raises(PipelineError, match="not a readable DICOM file"):
        read_frames(junk, PipelineSettings(), PREP)


# Each accepted transfer syntax, made from CT_small.dcm by DCMTK (or pydicom's own encoders where
# DCMTK has none): lossless ones must give exactly the native model input, lossy ones nearly.
DCMTK_ENCODINGS = {
    "RLE Lossless": ["dcmcrle"],
    "JPEG Lossless SV1": ["dcmcjpeg", "+e1"],
    "JPEG Lossless Process 14": ["dcmcjpeg", "+el"],
    "JPEG-LS Lossless": ["dcmcjpls"],
    "Deflated Explicit VR Little Endian": ["dcmconv", "+td"],
    "Explicit VR Big Endian": ["dcmconv", "+tb"],
    "Implicit VR Little Endian": ["dcmconv", "+ti"],
    "JPEG Extended 12-bit (lossy)": ["dcmcjpeg", "+ee"],
}
PYDICOM_ENCODINGS = {
    "JPEG 2000 Lossless": ("1.2.840.10008.1.2.4.90", {}),
    "JPEG 2000 (lossy)": ("1.2.840.10008.1.2.4.91", {"j2k_psnr": [80]}),
    "JPEG-LS Near-Lossless": ("1.2.840.10008.1.2.4.81", {"jls_error": 2}),
}


def _encoded_ct(name: str, tmp_path: Path) -> Path:
    src, out = get_testdata_file("CT_small.dcm"), tmp_path / "encoded.dcm"
    if name in DCMTK_ENCODINGS:
        cmd = DCMTK_ENCODINGS[name]
        need_tool(cmd[0])
        done = run([*cmd, src, str(out)])
        assert done.returncode == 0, done.stderr
    else:
        uid, kwargs = PYDICOM_ENCODINGS[name]
        ds = pydicom.dcmread(src)
        ds.compress(uid, **kwargs)
        ds.save_as(out)
    return out


@pytest.mark.parametrize("name", [*DCMTK_ENCODINGS, *PYDICOM_ENCODINGS])
def test_every_accepted_transfer_syntax_decodes_to_the_native_input(name: str, tmp_path: Path) -> None:
    path = _encoded_ct(name, tmp_path)
    assert (
        pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID != pydicom.uid.ExplicitVRLittleEndian
    )
    (native,) = read_frames(get_testdata_file("CT_small.dcm"), LUNG, PREP)
    (decoded,) = read_frames(path, LUNG, PREP)
    diff = np.abs(decoded.image - native.image)
    if "lossy" in name or "Near" in name:
        assert diff.mean() < 0.01 and diff.max() < 0.05  # window width 1500 HU: 0.01 = 15 HU
    else:
        assert diff.max() == 0.0


def test_jpeg_baseline_decodes_close_to_the_native_colour_image() -> None:
    (native,) = read_frames(get_testdata_file("SC_rgb.dcm"), PipelineSettings(), PREP)
    (baseline,) = read_frames(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm"), PipelineSettings(), PREP)
    assert np.abs(baseline.display.astype(int) - native.display.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "shape, size",
    [
        ((1955, 1841), (224, 211)),  # a radiograph to the model input: antialiased reduction
        ((512, 400), (224, 175)),
        ((224, 224), (150, 100)),  # unequal factors
        ((100, 80), (224, 179)),  # enlarged
        ((7, 7), (224, 224)),  # a CAM to the model input
    ],
)
def test_the_numpy_resize_is_torchs_antialiased_bilinear_interpolate(
    shape: tuple[int, int], size: tuple[int, int]
) -> None:
    """resize_planes (Pillow, no torch) gives what torch's interpolate(antialias=True) gave before it."""
    import torch  # the test environment has dxnode[train]

    from dxnode.pipeline import resize_planes

    planes = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    ours = resize_planes(planes, size)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(planes)[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0].numpy()
    assert ours.shape == ref.shape == (2, *size) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 2e-5  # float32 rounding: measured at most 8e-6 on values in [0, 1]


def test_to_tensor_matches_the_torch_resize_it_replaced() -> None:
    """The model input of a real CR (letterbox) and a colour image (centre crop) against a torch reference."""
    import torch  # the test environment has dxnode[train]

    F = torch.nn.functional
    for path, prep in [
        (DATA_STORE / "RG1_UNCR.dcm", PREP),
        (Path(get_testdata_file("examples_ybr_color.dcm")), Preprocessing(resize="center_crop")),
    ]:
        frame = read_frames(path, PipelineSettings(max_frames=1), prep)[0]
        g = geometry(*frame.image.shape[:2], prep)
        planes = torch.from_numpy(np.ascontiguousarray(frame.image.transpose(2, 0, 1)))[None]
        x = F.interpolate(
            planes, size=(g.resized_h, g.resized_w), mode="bilinear", align_corners=False, antialias=True
        )[0]
        ref = torch.zeros(3, g.size, g.size)
        st, sl, dt, dl = max(0, -g.top), max(0, -g.left), max(0, g.top), max(0, g.left)
        hh, ww = min(g.resized_h - st, g.size - dt), min(g.resized_w - sl, g.size - dl)
        ref[:, dt : dt + hh, dl : dl + ww] = x[:, st : st + hh, sl : sl + ww]
        ref = (ref - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)
        assert np.abs(to_tensor(frame, prep) - ref.numpy()).max() < 1e-4  # (normalised: /0.225)

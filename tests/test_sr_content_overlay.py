"""Overlays a radiologist can read through: low activations leave the image untinted, the tint rises with the map,
and the SC's colour scale shows the same fade."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from dicom_checks import dciodvfy_errors
from pydicom.data import get_testdata_file

from dxnode.config import Settings
from dxnode.model import overlay
from dxnode.outputs.report import write_outputs
from dxnode.outputs.sc import SCALE_GREY, colour_scale
from dxnode.pipeline import Frame, Preprocessing
from dxnode.pixels.colormap import OVERLAY_FLOOR, OVERLAY_MAX_ALPHA, jet, overlay_opacity
from dxnode.results import Finding, Heatmap, InstanceOutcome, ModelIdentity, StudyResult


def ramp_overlay(grey: int = 90) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(display, map, overlay) of a flat grey image under a map rising from 0 (left) to 1 (right)."""
    display = np.full((32, 256, 3), grey, np.uint8)
    cam = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (32, 1))
    frame = Frame(np.zeros((0, 0, 3), np.float32), display, 0, image_shape=(32, 256))
    rgb, source_cam = overlay(frame, cam, Preprocessing())
    assert np.array_equal(source_cam, cam)
    return display, cam, rgb


def test_no_tint_below_the_floor_and_rising_opacity_above_it() -> None:
    display, cam, rgb = ramp_overlay()
    below = cam < OVERLAY_FLOOR
    assert below.any() and np.array_equal(rgb[below], display[below])  # the anatomy as the viewer shows it
    change = np.abs(rgb.astype(int) - display.astype(int)).sum(axis=-1)[0]  # along the ramp
    above = change[~below[0]]
    assert above[-1] > 100 and above[0] < above[-1]  # the peak is clearly coloured, the floor barely
    alpha = overlay_opacity(cam[0])
    assert alpha[0] == 0 and alpha[-1] == OVERLAY_MAX_ALPHA and np.all(np.diff(alpha) >= 0)
    # the colour at the peak is the map's colour at its opacity over the image
    expected = display[0, -1] * (1 - OVERLAY_MAX_ALPHA) + jet(np.array([1.0]))[0] * 255 * OVERLAY_MAX_ALPHA
    assert np.abs(rgb[0, -1].astype(float) - expected).max() <= 1


def test_colour_scale_fades_in_from_grey() -> None:
    scale = colour_scale(200)
    assert scale.shape == (1, 200, 3) and scale.dtype == np.uint8
    assert tuple(scale[0, 0]) == (int(SCALE_GREY),) * 3  # untinted at the low end
    assert np.array_equal(
        scale[0, -1], np.rint(jet(np.array([1.0]))[0] * 255).astype(np.uint8)
    )  # full colour at the top


def test_heatmap_sc_leaves_the_low_map_part_of_the_image_untinted(tmp_path: Path) -> None:
    """A real SC through write_outputs: where the map is below the floor the SC shows the source's grey, elsewhere colour."""
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    display = np.repeat(np.linspace(0, 255, ds.Columns, dtype=np.float32)[np.newaxis, :, np.newaxis], ds.Rows, 0)
    display = np.repeat(display, 3, axis=2).astype(np.uint8)
    cam = np.zeros((ds.Rows, ds.Columns), np.float32)
    cam[: ds.Rows // 2] = 1.0  # the top half hot, the bottom half nothing
    frame = Frame(np.zeros((0, 0, 3), np.float32), display, 0, image_shape=(ds.Rows, ds.Columns))
    rgb, cam = overlay(frame, cam, Preprocessing())
    model = ModelIdentity("probe-net", "2.3", "ab" * 32, False, "multilabel")
    result = StudyResult(
        ds.StudyInstanceUID,
        model,
        [Finding("Effusion", 0.8, 0.5, True, ds.SOPInstanceUID)],
        [InstanceOutcome(ds.SOPInstanceUID, "done")],
        [Heatmap("Effusion", ds.SOPInstanceUID, 0, rgb, cam)],
    )
    written = write_outputs(result, {ds.SOPInstanceUID: path}, Settings(), tmp_path / "out")
    sc_path = next(w.path for w in written if w.kind == "sc")
    assert dciodvfy_errors(sc_path) == []
    sc = pydicom.dcmread(sc_path).pixel_array.astype(int)
    scale = sc.shape[1] / ds.Columns  # the SC is at least 512 px wide: the 128 px CT is enlarged
    image_rows = round(ds.Rows * scale)
    top, bottom = sc[: image_rows // 2 - 8], sc[image_rows // 2 + 8 : image_rows - 4]
    spread = lambda px: np.ptp(px, axis=-1)  # noqa: E731  0 for a grey pixel
    assert spread(bottom).max() <= 2  # no tint where the map is nothing
    assert np.median(spread(top)) > 60  # coloured where it is hot
    assert "untinted below 30%" in pydicom.dcmread(sc_path).ImageComments

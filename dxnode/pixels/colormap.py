"""matplotlib's 'jet' colour map as a NumPy table, so that heatmaps need no matplotlib."""

from __future__ import annotations

import functools

import numpy as np

# matplotlib's _jet_data: per channel, (x, value) breakpoints of a piecewise-linear ramp over [0, 1].
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


@functools.cache
def jet_table(n: int = 256) -> np.ndarray:
    """n x 3 float64 RGB in [0, 1]: the colours of matplotlib's colormaps['jet'](np.arange(n)) for n = 256."""
    x = np.linspace(0.0, 1.0, n)
    table = np.stack([np.interp(x, [p for p, _ in ch], [v for _, v in ch]) for ch in _JET], axis=-1)
    table.flags.writeable = False
    return table


def jet(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of values in [0, 1], quantised to 256 colours the way matplotlib looks a float up."""
    index = np.clip((np.asarray(values, dtype=np.float64) * 256).astype(np.intp), 0, 255)
    return jet_table()[index]


# Heatmap overlays fade low activations out, so the anatomy stays readable: no tint where the map is
# below OVERLAY_FLOOR, then an opacity rising linearly with the map to OVERLAY_MAX_ALPHA at its peak.
OVERLAY_FLOOR = 0.3
OVERLAY_MAX_ALPHA = 0.65


def overlay_opacity(values: np.ndarray) -> np.ndarray:
    """Opacity in [0, OVERLAY_MAX_ALPHA] of the colour drawn over the image, for map values in [0, 1]."""
    ramp = (np.asarray(values, dtype=np.float64) - OVERLAY_FLOOR) / (1.0 - OVERLAY_FLOOR)
    return OVERLAY_MAX_ALPHA * np.clip(ramp, 0.0, 1.0)


@functools.cache
def overlay_tables() -> tuple[np.ndarray, np.ndarray]:
    """(tint 256 x 3, keep 256) float32 for the 256 map levels: a pixel becomes image * keep + tint.

    Level i stands for map values [i/256, (i+1)/256), as jet() quantises them; the opacity is taken
    at the level's value i/255 so that 0 has none and the peak has OVERLAY_MAX_ALPHA.
    """
    alpha = overlay_opacity(np.arange(256) / 255.0)
    tint = (jet_table() * 255 * alpha[:, np.newaxis]).astype(np.float32)
    keep = (1.0 - alpha).astype(np.float32)
    tint.flags.writeable = keep.flags.writeable = False
    return tint, keep

"""PNG renderings for the web pages: heatmap Secondary Captures and arrays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB (or grayscale) uint8 array as PNG bytes."""
    # start-up time: PIL loads only when this runs
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def output_png(path: Path) -> bytes:
    """The pixels of an RGB Secondary Capture written by dxnode, as PNG."""
    ds = pydicom.dcmread(path)
    return png_bytes(ds.pixel_array.astype(np.uint8))

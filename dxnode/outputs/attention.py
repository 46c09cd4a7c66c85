"""Where the model looked: the Grad-CAM attention region of a heatmap as a closed outline in source pixels."""

from __future__ import annotations

from typing import Any

import numpy as np

# Share of the Grad-CAM peak above which a pixel belongs to the attention region.
ATTENTION_LEVEL = 0.5
# Most vertices of an attention outline; longer contours are subsampled.
MAX_OUTLINE_POINTS = 64


def connected_region(mask: np.ndarray, seed: tuple[Any, ...]) -> np.ndarray:
    """The part of a 2-D boolean mask 4-connected to seed (which is in it), as a boolean mask.

    Runs of each row are joined to the overlapping runs of the rows above and below: a Python
    loop over runs, not pixels (what scipy.ndimage.label's default structure connects).
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts = [np.flatnonzero(edges[r] == 1) for r in range(h)]  # run r: columns [start, end)
    ends = [np.flatnonzero(edges[r] == -1) for r in range(h)]
    out = np.zeros_like(mask, dtype=bool)
    r0, c0 = int(seed[0]), int(seed[1])
    first = int(np.searchsorted(ends[r0], c0, side="right"))
    todo, seen = [(r0, first)], {(r0, first)}
    while todo:
        r, i = todo.pop()
        s, e = int(starts[r][i]), int(ends[r][i])
        out[r, s:e] = True
        for nr in (r - 1, r + 1):
            if 0 <= nr < h:  # runs of row nr overlapping columns [s, e)
                for j in range(int(np.searchsorted(ends[nr], s, side="right")), int(np.searchsorted(starts[nr], e))):
                    if (nr, j) not in seen:
                        seen.add((nr, j))
                        todo.append((nr, j))
    return out


def attention_region(cam: np.ndarray) -> np.ndarray:
    """The attention region at the map's size: the connected part >= ATTENTION_LEVEL x peak holding the peak."""
    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0:
        return np.zeros(cam.shape, dtype=bool)
    return connected_region(cam >= ATTENTION_LEVEL * peak, np.unravel_index(int(np.argmax(cam)), cam.shape))


def to_source_grid(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A map at display size resampled to Rows x Columns by nearest pixel centre (edge to edge, as the outline)."""
    h, w = values.shape
    r = np.minimum(((np.arange(rows) + 0.5) * h / rows).astype(np.intp), h - 1)
    c = np.minimum(((np.arange(columns) + 0.5) * w / columns).astype(np.intp), w - 1)
    return values[np.ix_(r, c)]


def attention_outline(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Closed outline (column, row pairs, source pixel coordinates) of the map's region >= half its peak.

    The region is the connected part above ATTENTION_LEVEL that holds the peak; the map (the
    heatmap's, at display size: the source's or a downsampled copy of its extent) is scaled from
    its own size to Rows x Columns, edge to edge, with DICOM's convention that the image spans
    (0, 0) to (Columns, Rows) and pixel centres are at +0.5; the result is clipped to that span.
    """
    # start-up time: contourpy loads only when this runs
    from contourpy import contour_generator

    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    sx, sy = columns / cam.shape[1], rows / cam.shape[0]
    if peak <= 0:
        return np.array([[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=np.float32)
    mask = attention_region(cam)
    padded = np.pad(mask.astype(np.float32), 1)  # a zero border makes every contour closed
    lines: list[np.ndarray] = list(contour_generator(z=padded).lines(0.5))  # type: ignore[arg-type]
    line: np.ndarray = max(lines, key=len) if lines else np.empty((0, 2))
    if len(line) < 4:  # a point or a line: the bounding box of the region instead
        r, c = np.nonzero(mask)
        x0, x1, y0, y1 = c.min() - 0.5, c.max() + 0.5, r.min() - 0.5, r.max() + 0.5
        line = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]) + 1
    if len(line) > MAX_OUTLINE_POINTS:
        line = line[np.linspace(0, len(line) - 1, MAX_OUTLINE_POINTS).round().astype(int)]
    xy = (np.asarray(line, dtype=np.float64) - 1 + 0.5) * [sx, sy]  # back from the padding, to pixel edges
    xy = np.clip(xy, 0, [columns, rows])
    if not np.array_equal(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    return xy.round(2).astype(np.float32)

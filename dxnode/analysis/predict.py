"""One file through the classifier (`dxnode predict`, POST /api/predict): its findings and the top one's heatmap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dxnode.analysis.streaming import RunningStudy
from dxnode.config import Settings
from dxnode.model import Classifier, overlay
from dxnode.pipeline import PipelineError, read_frames, to_tensor
from dxnode.results import Finding, ModelIdentity


@dataclass
class FilePrediction:
    """The result of `dxnode predict` / POST /api/predict for one file."""

    file: str
    findings: list[Finding]
    model: ModelIdentity
    heatmap: np.ndarray | None  # RGB overlay for the top finding
    error: str | None = None
    display: np.ndarray | None = None  # the windowed image the heatmap is drawn on

    def to_dict(self, heatmap_path: str | None = None) -> dict[str, Any]:
        """The JSON object of `dxnode predict --json`."""
        return {
            "file": self.file,
            "findings": [
                {
                    "label": f.label,
                    "probability": round(f.probability, 6),
                    "positive": f.positive,
                    "threshold": f.threshold,
                }
                for f in self.findings
            ],
            "model": {"name": self.model.name, "version": self.model.version, "demo": self.model.demo},
            "heatmap": heatmap_path,
            "error": self.error,
        }


def predict_file(path: Path, classifier: Classifier, settings: Settings, top_k: int | None = None) -> FilePrediction:
    """Predict one DICOM/PNG/JPEG file (all its frames, aggregated); errors come back in .error."""
    prep = classifier.manifest.preprocessing
    try:
        frames = read_frames(Path(path), settings.pipeline, prep, display_max_side=settings.report.sc_max_side)
    except PipelineError as exc:
        return FilePrediction(str(path), [], classifier.identity, None, str(exc))
    if not frames:
        return FilePrediction(str(path), [], classifier.identity, None, "no frame to analyse")
    probs, cams = classifier.predict_with_cam(np.stack([to_tensor(f, prep) for f in frames]))
    running = RunningStudy(len(classifier.manifest.labels))
    running.fold(probs, cams, [("", i) for i in range(len(frames))])  # keys: positions in frames
    drivers = [(frames[i].sop_instance_uid or None, frames[i].frame_index) for _, i in running.driver]
    findings = classifier.findings(running.study(settings.model.aggregate), drivers, top_k or None)
    top = classifier.manifest.labels.index(findings[0].label)
    shown = frames[running.driver[top][1]]
    assert running.cams is not None
    rgb, _ = overlay(shown, running.cams[top], prep)
    return FilePrediction(str(path), findings, classifier.identity, rgb, None, shown.display)


def save_png(rgb: np.ndarray, path: Path) -> Path:
    """Write an RGB uint8 array as PNG."""
    # start-up time: PIL loads only when this runs
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path

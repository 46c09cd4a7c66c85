"""Result types passed between the model, report, store and web stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dxnode.states import Task


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result: written into the DB, the SR and every output."""

    name: str
    version: str
    sha256: str  # of the weights file
    demo: bool  # True for the untrained demo model: every output says so
    task: Task
    # Standard codes of labels, (label, code value, scheme, meaning): dxnode.inference.codes; others get 99DXNODE.
    codes: tuple[tuple[str, str, str, str], ...] = ()


@dataclass(frozen=True)
class Finding:
    """A study-level result for one label."""

    label: str
    probability: float
    threshold: float
    positive: bool
    source_sop_instance_uid: str | None  # the instance that drove this probability
    source_frame: int = 0  # 0-based frame of that instance


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one instance of the study in the pipeline."""

    sop_instance_uid: str
    state: str  # "done", "skipped" or "failed"
    reason: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Heatmap:
    """A Grad-CAM overlay for one finding, on the frame that drove it."""

    label: str
    sop_instance_uid: str
    frame: int
    # The source frame's extent at display size: the decoded size, downsampled to [report] sc_max_side.
    overlay: np.ndarray  # hxwx3 uint8 RGB: windowed source image with the colour map blended in
    cam: np.ndarray  # hxw float32 in [0, 1], the map at the overlay's size


@dataclass
class StudyResult:
    """Everything the model stage found for one study."""

    study_instance_uid: str
    model: ModelIdentity
    findings: list[Finding]  # most probable first
    instances: list[InstanceOutcome]
    heatmaps: list[Heatmap] = field(default_factory=list)
    route: str = ""  # the [[models]] entry that produced it ("" for [model]); part of the output UIDs

    @property
    def positive(self) -> list[Finding]:
        """Findings at or above their threshold."""
        return [f for f in self.findings if f.positive]

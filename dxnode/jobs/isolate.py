"""One bad instance does not cost the study its results: which instance a deterministic failure belongs to.

In the pipeline an instance whose data raises a deterministic error fails alone (``fails_alone``, passed
to analyze_study). At the output stage a failure cannot say which source it came from, so each instance
the result references (the drivers of its findings and heatmaps: a handful) is tried alone, its outputs
built into a scratch folder that is then removed; those whose outputs fail deterministically alone are
the culprits. The job body leaves them out and analyses the study again without them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dxnode.config import Settings
from dxnode.outputs.report import write_outputs
from dxnode.results import InstanceOutcome, StudyResult
from dxnode.states import InstanceState
from dxnode.worklist.queue import classify

# Rounds of analysis after leaving instances out. A value that every instance of the study carries (a
# study-level attribute) fails each new driver in turn: after these rounds (or once every instance was
# blamed) the job body puts them all back and writes what can be built, with notes (jobs/body.py).
MAX_LEFT_OUT_ROUNDS = 3


def fails_alone(exc: Exception) -> str | None:
    """The reason an exception raised decoding one instance fails that instance alone, when deterministic."""
    failure = classify(exc, "analyze", "cannot analyse this instance")
    return str(failure) if failure.permanent else None


def referenced(result: StudyResult, sources: dict[str, Path]) -> list[str]:
    """The instances whose headers or frames the outputs read: drivers of findings and heatmaps."""
    uids = {f.source_sop_instance_uid for f in result.findings if f.source_sop_instance_uid in sources}
    return sorted(uids | {h.sop_instance_uid for h in result.heatmaps if h.sop_instance_uid in sources})


def alone(result: StudyResult, uid: str) -> StudyResult:
    """The part of a result that one instance drives: its findings, their heatmaps on it."""
    heatmaps = [h for h in result.heatmaps if h.sop_instance_uid == uid]
    labels = {h.label for h in heatmaps}
    findings = [f for f in result.findings if f.source_sop_instance_uid == uid or f.label in labels]
    instances = [o for o in result.instances if o.sop_instance_uid == uid]
    return StudyResult(result.study_instance_uid, result.model, findings, instances, heatmaps, result.route)


def culprits(result: StudyResult, sources: dict[str, Path], settings: Settings) -> dict[str, str]:
    """The referenced instances whose outputs fail deterministically on their own, with the reason."""
    bad: dict[str, str] = {}
    for uid in referenced(result, sources):
        with tempfile.TemporaryDirectory(prefix="dxnode-outputs-alone-") as scratch:
            try:
                write_outputs(alone(result, uid), {uid: sources[uid]}, settings, Path(scratch), strict=True)
            except Exception as exc:  # classified: only a deterministic failure names a culprit
                failure = classify(exc, "outputs", "its results cannot be written")
                if failure.permanent:
                    bad[uid] = str(failure)
    return bad


def with_left_out(result: StudyResult, left_out: dict[str, str], order: list[str]) -> StudyResult:
    """The result with the instances left out added as failed, with their reasons, in the study's order."""
    if not left_out:
        return result
    outcomes = {o.sop_instance_uid: o for o in result.instances}
    outcomes |= {uid: InstanceOutcome(uid, InstanceState.FAILED, reason) for uid, reason in left_out.items()}
    result.instances = [outcomes[uid] for uid in order if uid in outcomes]
    return result

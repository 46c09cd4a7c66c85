"""Routing: which configured model(s) analyse which series of a study.

``[[models]]`` entries each carry match rules on a series (modality, body part, SOP classes,
series and study description regular expressions, calling AE titles, instance count). A study
gets one job per entry that at least one of its series matches, and that job analyses only the
matching series. Without ``[[models]]`` the ``[model]`` section is the single entry "" that
matches everything (the pipeline's own eligibility rules still apply). A study no entry matches
gets a "skipped" job whose log says why each entry refused it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dxnode.config import ModelEntry, ModelSettings, Settings
from dxnode.store import Instance, Series, Study


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at in one series."""

    series_instance_uid: str
    modality: str
    body_part: str
    description: str
    instances: int
    sop_classes: frozenset[str]
    calling_aets: frozenset[str]


@dataclass(frozen=True)
class StudyFacts:
    """A study as the rules see it."""

    study_description: str
    calling_aet: str
    series: list[SeriesFacts] = field(default_factory=list)


@dataclass(frozen=True)
class Route:
    """A model entry and the series of the study it analyses."""

    model: str  # the [[models]] name, "" for the single [model] section
    series: frozenset[str]


def entries(settings: Settings) -> list[ModelEntry]:
    """The configured models: the [[models]] tables, else [model] as one entry matching everything."""
    return list(settings.models) or [ModelEntry(name="")]


def entry(settings: Settings, name: str) -> ModelEntry | None:
    """The entry of that name ("" is [model] when there are no [[models]])."""
    return next((e for e in entries(settings) if e.name == name), None)


def model_settings(settings: Settings, e: ModelEntry) -> ModelSettings:
    """The [model] section with the entry's bundle and engine in it."""
    update: dict[str, object] = {}
    if e.bundle == "imagenet":  # torchvision's ImageNet file, where [model] imagenet_weights says
        from dxnode.model import IMAGENET_FILE, imagenet_weights_path

        weights = imagenet_weights_path(settings.model)
        if not weights.is_file():
            raise FileNotFoundError(f"model {e.name}: bundle = 'imagenet' needs {IMAGENET_FILE} at {weights}")
        update["bundle"] = f"imagenet:{weights}"
    elif e.bundle:
        update["bundle"] = e.bundle
    if e.engine:
        update["engine"] = e.engine
    return ModelSettings.model_validate({**settings.model.model_dump(), **update})


def facts(session: Session, study_id: int) -> StudyFacts:
    """The study's series with their instance counts, SOP classes and senders."""
    study = session.get(Study, study_id)
    assert study is not None
    keys = (
        Series.series_instance_uid,
        Series.modality,
        Series.body_part_examined,
        Series.series_description,
        Instance.sop_class_uid,
        Instance.calling_aet,
    )
    rows = session.execute(
        select(*keys, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .group_by(*keys)
    ).all()
    merged: dict[str, tuple[str, str, str]] = {}
    counts: dict[str, int] = {}
    classes: dict[str, set[str]] = {}
    aets: dict[str, set[str]] = {}
    for uid, modality, body_part, description, sop_class, aet, n in rows:
        merged[uid] = (modality or "", body_part or "", description or "")
        counts[uid] = counts.get(uid, 0) + int(n)
        classes.setdefault(uid, set()).add(sop_class)
        aets.setdefault(uid, set()).add(aet or "")
    return StudyFacts(
        study.study_description or "",
        study.calling_aet or "",
        [
            SeriesFacts(uid, *merged[uid], counts[uid], frozenset(classes[uid]), frozenset(aets[uid]))
            for uid in sorted(merged)
        ],
    )


def refusal(e: ModelEntry, study: StudyFacts, s: SeriesFacts) -> str:
    """'' if the series matches the entry's rules, else the first rule it fails, in words."""
    upper = {x.upper() for x in e.modalities}
    if e.modalities and s.modality.upper() not in upper:
        return f"modality {s.modality or '(none)'} not in {e.modalities}"
    if e.body_parts and s.body_part.upper() not in {x.upper() for x in e.body_parts}:
        return f"body part {s.body_part or '(none)'} not in {e.body_parts}"
    if e.sop_classes and not s.sop_classes & set(e.sop_classes):
        return f"SOP classes {sorted(s.sop_classes)} not in {e.sop_classes}"
    if e.series_description and not re.search(e.series_description, s.description, re.IGNORECASE):
        return f"series description {s.description!r} does not match {e.series_description!r}"
    if e.study_description and not re.search(e.study_description, study.study_description, re.IGNORECASE):
        return f"study description {study.study_description!r} does not match {e.study_description!r}"
    if e.calling_aets and not (s.calling_aets | {study.calling_aet}) & set(e.calling_aets):
        return f"calling AE {sorted(s.calling_aets - {''}) or ['(none)']} not in {e.calling_aets}"
    if e.min_instances is not None and s.instances < e.min_instances:
        return f"{s.instances} instance(s) < min_instances {e.min_instances}"
    if e.max_instances is not None and s.instances > e.max_instances:
        return f"{s.instances} instance(s) > max_instances {e.max_instances}"
    return ""


def route(settings: Settings, study: StudyFacts) -> tuple[list[Route], list[str]]:
    """The entries the study goes to (with their series), and why each other entry refused it."""
    routes, reasons = [], []
    for e in entries(settings):
        matched, why = [], []
        for s in study.series:
            reason = refusal(e, study, s)
            if reason:
                why.append(f"series {s.series_instance_uid}: {reason}")
            else:
                matched.append(s.series_instance_uid)
        if matched:
            routes.append(Route(e.name, frozenset(matched)))
        else:
            reasons.append(f"model {e.name or '[model]'}: " + ("; ".join(why[:5]) or "the study has no series"))
    return routes, reasons


@dataclass(frozen=True)
class Decision:
    """What a job runs: its entry (None: skipped), the series it analyses, its settings, and the log lines."""

    entry: ModelEntry | None
    series: frozenset[str]
    settings: Settings
    lines: list[str]


def job_settings(settings: Settings, e: ModelEntry) -> Settings:
    """The settings a job of this entry runs with: its model, heatmaps, SC size, SR/SC series numbers and descriptions."""
    if not settings.models:
        return settings
    index = [m.name for m in settings.models].index(e.name)
    r = settings.report
    report = r.model_copy(
        update={
            "heatmap_for": e.heatmap_for or r.heatmap_for,
            "sc_max_side": r.sc_max_side if e.sc_max_side is None else e.sc_max_side,
            "sr_series_number": e.sr_series_number or r.sr_series_number + 10 * index,
            "sc_series_number": e.sc_series_number or r.sc_series_number + 10 * index,
            "sr_series_description": (e.sr_series_description or f"{r.sr_series_description} ({e.name})")[:64],
            "sc_series_description": (e.sc_series_description or f"{r.sc_series_description} ({e.name})")[:64],
        }
    )
    return settings.model_copy(update={"model": model_settings(settings, e), "report": report})


def resolve_job(session: Session, settings: Settings, job_id: int) -> Decision:
    """Route a job when it starts: an unrouted job ("" with [[models]]) takes the first matching entry
    and queues one job for each other one; a routed job re-checks its own entry. Rules are read now,
    so changing them and re-queueing re-routes."""
    from dxnode.store import Job

    job = session.get(Job, job_id)
    assert job is not None
    study = facts(session, job.study_id)
    routes, refusals = route(settings, study)
    if settings.models and job.routed_model:  # already routed: only its own entry
        routes = [r for r in routes if r.model == job.routed_model]
        if entry(settings, job.routed_model) is None:
            refusals = [f"model {job.routed_model} is no longer configured"]
        else:
            refusals = [x for x in refusals if x.startswith(f"model {job.routed_model}:")]
    if not routes:
        return Decision(
            None,
            frozenset(),
            settings,
            ["routing: no model matches this study", *(f"routing: not {x}" for x in refusals)],
        )
    first, others = routes[0], routes[1:]
    job.routed_model = first.model
    for r in others:
        waiting = session.scalar(
            select(Job.id).where(Job.study_id == job.study_id, Job.state == "queued", Job.routed_model == r.model)
        )
        if waiting is None:
            session.add(Job(study_id=job.study_id, state="queued", routed_model=r.model))
    e = entry(settings, first.model)
    assert e is not None
    lines = []
    if settings.models:
        lines.append(
            f"routing: model {first.model} for {len(first.series)} of {len(study.series)} series"
            + (f"; also queued: {', '.join(r.model for r in others)}" if others else "")
        )
        lines += [f"routing: not {x}" for x in refusals]
    return Decision(e, first.series, job_settings(settings, e), lines)

"""Routing: which configured model(s) analyse which series of a study.

``[[models]]`` entries each carry match rules on a series (modality, body part, SOP classes,
series and study description regular expressions, calling AE titles, instance count). A study
gets one job per entry that at least one of its series matches, and that job analyses only the
matching series. Without ``[[models]]`` the ``[model]`` section is the single entry "" that
matches everything (the pipeline's own eligibility rules still apply). A study no entry matches
gets a "skipped" job whose log says why each entry refused it.

What the model is for: an entry's modalities, body_parts and sop_classes, else [pipeline]'s, are
the admin's choice and used as written; a key left empty in both takes what the entry's bundle
declares (its manifest's intended_use, dxnode.inference.intended), so the demo's chest model gets CR/DX
CHEST series only and a CT study is skipped with "skipped: model dxnode-demo is for CR/DX CHEST".
The declared photometric and minimum size are checked per instance (the job's [pipeline]).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dxnode.config import ModelEntry, ModelSettings, Settings
from dxnode.inference.bundle import IMAGENET_FILE, imagenet_weights_path
from dxnode.inference.intended import DEMO_NAME, DEMO_USE, IntendedUse, body_part_matches, read_declaration
from dxnode.store import Instance, Job, Series, Study
from dxnode.worklist.queue import queued_job

log = logging.getLogger("dxnode.worklist.routing")


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
    left_out: tuple[str, ...] = ()  # why the study's other series are not analysed by it


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
        weights = imagenet_weights_path(settings.model)
        if not weights.is_file():
            raise FileNotFoundError(f"model {e.name}: bundle = 'imagenet' needs {IMAGENET_FILE} at {weights}")
        update["bundle"] = f"imagenet:{weights}"
    elif e.bundle:
        update["bundle"] = e.bundle
    if e.engine:
        update["engine"] = e.engine
    return ModelSettings.model_validate({**settings.model.model_dump(), **update})


@dataclass(frozen=True)
class Scope:
    """What an entry's bundle declares it is for, less the keys the admin set (those are used as written)."""

    model: str  # the bundle's model name, for messages
    declared: IntendedUse  # the whole declaration, for messages
    modalities: tuple[str, ...]  # checked per series here
    body_parts: tuple[str, ...]
    sop_classes: tuple[str, ...]
    photometric: tuple[str, ...]  # checked per instance, through the job's [pipeline] (job_settings)
    min_rows: int
    min_columns: int


def declaration(settings: Settings, e: ModelEntry) -> tuple[str, IntendedUse | None]:
    """The entry's bundle's model name and intended use (None: declares nothing), from its manifest only.

    A bundle that cannot be read declares nothing here: loading it fails the job with the reason.
    Torch-free (the receiver process calls it at start): dxnode.inference.bundle is not imported."""
    bundle = e.bundle or settings.model.bundle
    if not bundle:  # as load_classifier: ImageNet when its file is there, else the demo
        bundle = "imagenet" if imagenet_file(settings.model).is_file() else "demo"
    if bundle == "demo":
        return DEMO_NAME, DEMO_USE
    if bundle == "imagenet" or bundle.startswith("imagenet:"):
        return "torchvision-resnet18-imagenet", None
    try:
        return read_declaration(Path(bundle).expanduser())
    except (OSError, ValueError) as exc:
        log.debug("model %s: no declaration read: %s", e.name or "[model]", exc)
        return Path(bundle).name, None


def imagenet_file(ms: ModelSettings) -> Path:
    """Where dxnode.inference.bundle.imagenet_weights_path looks for torchvision's ImageNet file (same rule, no torch import)."""
    if ms.imagenet_weights:
        return Path(ms.imagenet_weights).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"
    return Path(os.environ.get("TORCH_HOME", cache)).expanduser() / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def scope(settings: Settings, e: ModelEntry) -> Scope | None:
    """The declared rules the entry applies (the admin's keys win); None when the bundle declares nothing."""
    name, use = declaration(settings, e)
    if use is None:
        return None
    p = settings.pipeline
    return Scope(
        name,
        use,
        () if e.modalities or p.modalities else use.modalities,
        () if e.body_parts or p.body_parts else use.body_parts,
        () if e.sop_classes or p.sop_classes else use.sop_classes,
        () if p.photometric else use.photometric,
        0 if p.min_rows else use.min_rows,
        0 if p.min_columns else use.min_columns,
    )


def out_of_scope(sc: Scope | None, s: SeriesFacts) -> str:
    """'' if the series is within what the bundle declares (as far as the admin left it), else why not."""
    if sc is None:
        return ""
    if sc.modalities and s.modality.upper() not in sc.modalities:
        what = f"modality {s.modality or '(none)'}"
    elif sc.body_parts and not body_part_matches(sc.body_parts, s.body_part):
        what = f"body part {s.body_part}"
    elif sc.sop_classes and not s.sop_classes & set(sc.sop_classes):
        what = f"SOP classes {sorted(s.sop_classes)}"
    else:
        return ""
    return f"{what}: {for_what(sc)}"


def for_what(sc: Scope) -> str:
    """E.g. "model dxnode-demo is for CR/DX CHEST"."""
    return f"model {sc.model} is for {sc.declared.short()}"


def beyond_declaration(settings: Settings) -> list[str]:
    """Where the admin's explicit filters go beyond what a bundle declares (logged as warnings at start)."""
    out = []
    p = settings.pipeline
    for e in entries(settings):
        name, use = declaration(settings, e)
        if use is None:
            continue
        where = f"model {e.name or '[model]'} ({name}, for {use.short()})"
        modalities = e.modalities or p.modalities
        extra = [m for m in modalities if use.modalities and m.upper() not in use.modalities]
        if extra:
            out.append(f"{where}: modalities {extra} go beyond the bundle's declared {list(use.modalities)}")
        parts = e.body_parts or p.body_parts
        extra = [b for b in parts if not body_part_matches(use.body_parts, b)]
        if extra:
            out.append(f"{where}: body parts {extra} go beyond the bundle's declared {list(use.body_parts)}")
        classes = e.sop_classes or p.sop_classes
        extra = [c for c in classes if use.sop_classes and c not in use.sop_classes]
        if extra:
            out.append(f"{where}: SOP classes {extra} go beyond the bundle's declared {list(use.sop_classes)}")
        extra = [x for x in p.photometric if use.photometric and x.upper() not in use.photometric]
        if extra:
            out.append(f"{where}: photometric {extra} goes beyond the bundle's declared {list(use.photometric)}")
        if (p.min_rows and p.min_rows < use.min_rows) or (p.min_columns and p.min_columns < use.min_columns):
            out.append(
                f"{where}: [pipeline] min_rows/min_columns {p.min_rows} x {p.min_columns} are below the bundle's"
                f" declared {use.min_rows} x {use.min_columns}"
            )
    return out


def warn_beyond_declaration(settings: Settings) -> None:
    """Log a warning for each explicit filter that goes beyond a bundle's declared intended use."""
    for line in beyond_declaration(settings):
        log.warning("%s: results there are outside what the model is for", line)


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
    routes, reasons, _ = _route(settings, study)
    return routes, reasons


def _route(settings: Settings, study: StudyFacts) -> tuple[list[Route], list[str], dict[str, str]]:
    """route(), and for each entry refused by its bundle's declaration alone, "model X is for ..." by name."""
    routes, reasons, out_of = [], [], {}
    for e in entries(settings):
        matched, why, sc, declared_only = [], [], scope(settings, e), bool(study.series)
        for s in study.series:
            reason = refusal(e, study, s)
            declared_only &= not reason
            reason = reason or out_of_scope(sc, s)
            if reason:
                why.append(f"series {s.series_instance_uid}: {reason}")
            else:
                matched.append(s.series_instance_uid)
        if matched:
            routes.append(Route(e.name, frozenset(matched), tuple(why)))
            continue
        reasons.append(f"model {e.name or '[model]'}: " + ("; ".join(why[:5]) or "the study has no series"))
        if declared_only and sc is not None:
            out_of[e.name] = for_what(sc)
    return routes, reasons, out_of


@dataclass(frozen=True)
class Decision:
    """What a job runs: its entry (None: skipped), the series it analyses, its settings, and the log lines."""

    entry: ModelEntry | None
    series: frozenset[str]
    settings: Settings
    lines: list[str]


def job_settings(settings: Settings, e: ModelEntry) -> Settings:
    """The settings a job of this entry runs with: its model, heatmaps, SC size, SR/SC series numbers and
    descriptions, and in [pipeline] the photometric and minimum size its bundle declares (unless set)."""
    sc = scope(settings, e)
    if sc is not None and (sc.photometric or sc.min_rows or sc.min_columns):
        p = settings.pipeline
        pipeline = p.model_copy(
            update={
                "photometric": p.photometric or list(sc.photometric),
                "min_rows": p.min_rows or sc.min_rows,
                "min_columns": p.min_columns or sc.min_columns,
            }
        )
        settings = settings.model_copy(update={"pipeline": pipeline})
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

    job = session.get(Job, job_id)
    assert job is not None
    study = facts(session, job.study_id)
    routes, refusals, out_of = _route(settings, study)
    if settings.models and job.routed_model:  # already routed: only its own entry
        routes = [r for r in routes if r.model == job.routed_model]
        if entry(settings, job.routed_model) is None:
            refusals, out_of = [f"model {job.routed_model} is no longer configured"], {}
        else:
            refusals = [x for x in refusals if x.startswith(f"model {job.routed_model}:")]
            out_of = {k: v for k, v in out_of.items() if k == job.routed_model}
    if not routes:
        # Every entry refused by its bundle's declaration alone: say so first, as the study's reason.
        summary = f"skipped: {'; '.join(dict.fromkeys(out_of.values()))}" if len(out_of) == len(refusals) else ""
        return Decision(
            None,
            frozenset(),
            settings,
            [f"routing: {summary or 'no model matches this study'}", *(f"routing: not {x}" for x in refusals)],
        )
    first, others = routes[0], routes[1:]
    job.routed_model = first.model
    for r in others:
        queued_job(session, job.study_id, r.model)
    e = entry(settings, first.model)
    assert e is not None
    lines = []
    if settings.models:
        lines.append(
            f"routing: model {first.model} for {len(first.series)} of {len(study.series)} series"
            + (f"; also queued: {', '.join(r.model for r in others)}" if others else "")
        )
        lines += [f"routing: not {x}" for x in refusals]
    elif first.left_out:  # the single model: say which series it leaves out, and why
        lines.append(f"routing: model [model] for {len(first.series)} of {len(study.series)} series")
    lines += [f"routing: left out {x}" for x in first.left_out[:20]]
    return Decision(e, first.series, job_settings(settings, e), lines)

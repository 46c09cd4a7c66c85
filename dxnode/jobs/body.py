"""The job body the worklist runner calls: study files -> model -> findings -> SR/SC -> outbox.

Each step commits what it produced before the next one starts, so a crash anywhere is resumed
by running the job again: findings of an attempt replace those of earlier attempts of the same
job, and outputs have deterministic UIDs, so a re-run writes the same objects and queues no
second delivery for an object already in the outbox. A failure is classified where its stage ends
(``_stage``): the job records one line naming the stage, and bad input is not retried. An instance
whose own data fails deterministically, in the pipeline or at the output stage, is left out and the
study reported without it (``_Attempt``, dxnode/jobs/isolate.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from dxnode import metrics
from dxnode.analysis.streaming import analyze_study
from dxnode.config import Settings
from dxnode.hl7.results import enqueue as enqueue_hl7
from dxnode.jobs.isolate import MAX_LEFT_OUT_ROUNDS, culprits, fails_alone, with_left_out
from dxnode.model import load_classifier
from dxnode.outbox.dispatch import enqueue
from dxnode.outputs.report import wanted_kinds, write_outputs
from dxnode.results import StudyResult
from dxnode.states import InstanceState, JobState, OutputKind
from dxnode.store import FindingRow, Instance, InstanceResult, Job, Output, Series, Store, Study, audit, utcnow
from dxnode.worklist.queue import JobFailure, classify
from dxnode.worklist.routing import resolve_job

if TYPE_CHECKING:
    from dxnode.model import Classifier, ModelRegistry

log = logging.getLogger("dxnode.jobs.body")


@contextmanager
def _stage(name: str, what: str) -> Iterator[None]:
    """Run one stage of the job: an exception leaving it becomes a classified JobFailure naming it.

    Stopping and TakenOver (BaseExceptions) pass through: they are not failures."""
    try:
        yield
    except Exception as exc:
        raise classify(exc, name, what) from exc


def run_job(
    store: Store,
    settings: Settings,
    job_id: int,
    heartbeat: Callable[[str], None] | None = None,
    registry: ModelRegistry | None = None,
) -> JobState:
    """Run the whole analysis of one job; return DONE or SKIPPED (raise on failure).

    heartbeat, when given, is called with the stage name at stage boundaries and between model
    batches (the worklist refreshes the job's heartbeat with it, and stops the job there when the
    node stops). The seconds spent per stage are stored on the job (Job.timings, the source of
    dxnode_stage_seconds), also for an attempt that failed (as far as it got). registry: the job process's
    models and decoding threads (without one, this job loads its own)."""

    beat = heartbeat or (lambda stage: None)
    beat("load")
    with _stage("route", "cannot route the study"), store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None, f"job {job_id} vanished"
        study = session.get(Study, job.study_id)
        assert study is not None
        if study.ignored:
            job.log = "study is marked ignored: not analysed"
            return JobState.SKIPPED
        study_uid, calling_aet, queued_at = study.study_instance_uid, study.calling_aet, job.created_at
        decision = resolve_job(session, settings, job_id)  # which model, which series (dxnode/worklist/routing.py)
        if decision.entry is None:
            job.log = "\n".join(decision.lines)
            return JobState.SKIPPED
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.file_path)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.study_id == study.id, Series.series_instance_uid.in_(decision.series))
            .order_by(Instance.series_id, Instance.instance_number, Instance.id)
        ).all()
    instances = [(uid, settings.data_dir / path) for uid, path in rows]
    settings = decision.settings

    timings: dict[str, float] = {}
    state = JobState.FAILED
    try:
        with _stage("load", "cannot load the model"):
            load = registry.get if registry is not None else load_classifier
            classifier = load(settings.model, data_dir=settings.data_dir)
        attempt = _Attempt(
            store,
            settings,
            job_id,
            study.id,
            study_uid,
            calling_aet,
            instances,
            decision.entry.name,
            decision.lines,
            beat,
            timings,
            functools.partial(_analyse, study_uid, instances, classifier, settings, beat, timings, registry),
        )
        recorded = attempt.report()
        if recorded == JobState.SKIPPED:
            state = recorded
            return state
        with _stage("hl7", "cannot queue the HL7 results"):
            hl7_rows = enqueue_hl7(store, settings, job_id)  # ORU^R01 / FHIR to [[hl7.destinations]]
        if hl7_rows:
            with store.session() as session:
                job = session.get(Job, job_id)
                assert job is not None
                job.log += f"\nHL7 result -> {hl7_rows} destination(s)"
        state = JobState.DONE
        return state
    finally:
        if state != JobState.FAILED:
            timings["queued_to_done"] = (utcnow() - queued_at).total_seconds()
        _record_timings(store, job_id, timings)


def _analyse(
    study_uid: str,
    instances: list[tuple[str, Path]],
    classifier: Classifier,
    settings: Settings,
    beat: Callable[[str], None],
    timings: dict[str, float],
    registry: ModelRegistry | None,
    left_out: dict[str, str],
) -> StudyResult:
    """The study through the model, without the instances left out (a deterministic error fails one instance alone)."""
    beat("analyze")
    started = time.perf_counter()
    with _stage("analyze", "cannot analyse the study"):
        result = analyze_study(
            study_uid,
            [(uid, path) for uid, path in instances if uid not in left_out],
            classifier,
            settings,
            heatmap_for=settings.report.heatmap_for,
            progress=beat,
            timings=timings,
            pool=registry.decode_pool(settings.model.decode_threads) if registry is not None else None,
            fails_alone=fails_alone,
        )
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    return with_left_out(result, left_out, [uid for uid, _ in instances])


@dataclass
class _Attempt:
    """One attempt's analysis, findings and outputs; an instance whose outputs fail deterministically on their
    own is left out and the study analysed again without it (at most MAX_LEFT_OUT_ROUNDS times)."""

    store: Store
    settings: Settings
    job_id: int
    study_id: int
    study_uid: str
    calling_aet: str
    instances: list[tuple[str, Path]]
    route: str
    routing: list[str]  # the routing decision's lines, first in the job log
    beat: Callable[[str], None]
    timings: dict[str, float]
    analyse: Callable[[dict[str, str]], StudyResult]  # the study without the instances left out
    left_out: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> why its outputs failed
    logged: set[str] = field(default_factory=set)  # failed instances already logged (an earlier round)

    def report(self) -> JobState:
        """Analyse, record and write the outputs, leaving out instances that fail them; DONE or SKIPPED."""
        for _ in range(MAX_LEFT_OUT_ROUNDS):
            try:
                return self._once(last=False)
            except _LeaveOut as leave:
                self.left_out |= leave.culprits
                if len(self.left_out) >= len(self.instances):
                    break
        # Blamed round after round (or every instance): a cause the study shares, not one instance's. All
        # of them again, and the objects that can be built, with a note for each kind that cannot.
        self.left_out = {}
        return self._once(last=True)

    def _once(self, last: bool) -> JobState:
        result = self.analyse(self.left_out)
        result.route = self.route
        order = [uid for uid, _ in self.instances]
        _log_failed_instances(self.job_id, result, order, self.logged)
        self.beat("findings")
        lines = self.routing + _describe(result) + _left_out_lines(self.left_out, order)
        with _stage("findings", "cannot record the findings"):
            recorded = _record_findings(self.store, self.job_id, result, lines, bool(self.left_out))
        if recorded == JobState.SKIPPED:
            return recorded
        self.beat("outputs")
        sources = dict(self.instances)
        write = functools.partial(
            _write_outputs, self.store, self.settings, self.job_id, self.study_id, result, sources, self.calling_aet
        )
        try:
            with _stage("outputs", "cannot write or queue the SR/SC"):
                outputs = write(self.timings, strict=not last)
        except JobFailure as failure:
            if not failure.permanent or last:
                raise
            bad = culprits(result, sources, self.settings)
            if bad:
                raise _LeaveOut(bad) from failure
            # No instance to blame: the objects that can be built, with notes, rather than no result at all.
            with _stage("outputs", "cannot write or queue the SR/SC"):
                outputs = write(self.timings, strict=False)
        with _stage("outputs", "cannot write or queue the SR/SC"):
            _log_outputs(self.store, self.job_id, outputs)
        return JobState.DONE


class _LeaveOut(Exception):
    """The output stage failed deterministically on these instances' data alone: analyse again without them."""

    def __init__(self, culprits: dict[str, str]) -> None:
        super().__init__(", ".join(culprits))
        self.culprits = culprits


def _left_out_lines(left_out: dict[str, str], order: list[str]) -> list[str]:
    """Job log lines naming each instance left out of the results (its place, UID and reason)."""
    place = {uid: i + 1 for i, uid in enumerate(order)}
    return [
        f"left out of the results: instance {place.get(uid, 0)} of {len(order)} ({uid}): {reason}"
        for uid, reason in left_out.items()
    ]


def _log_failed_instances(job_id: int, result: StudyResult, order: list[str], logged: set[str]) -> None:
    """One WARNING line per instance that failed, naming it by its place in the job (UIDs at DEBUG), once."""
    place = {uid: i + 1 for i, uid in enumerate(order)}
    for outcome in result.instances:
        if outcome.state == InstanceState.FAILED and outcome.sop_instance_uid not in logged:
            logged.add(outcome.sop_instance_uid)
            where = place.get(outcome.sop_instance_uid, 0)
            log.warning("job %d: instance %d of %d failed: %s", job_id, where, len(order), outcome.reason)
            log.debug("job %d: instance %d is %s", job_id, where, outcome.sop_instance_uid)


def _log_outputs(store: Store, job_id: int, outputs: list[_Written]) -> None:
    """Add a line per output, and the notes on values changed in copying source attributes, to the job log."""
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.log += "\n" + "\n".join(
            f"output {o.kind.upper()} {o.label or ''} -> {o.deliveries} destination(s)".replace("  ", " ")
            for o in outputs
        )
        notes = sorted({n for o in outputs for n in o.notes})
        if notes:  # values changed when copying source attributes into the SR/SC (never the values)
            job.log += "\n" + "\n".join(f"note: {n}" for n in notes)


def _record_timings(store: Store, job_id: int, timings: dict[str, float]) -> None:
    """Store the stage seconds on the job (dxnode_stage_seconds is built from them) and add a log line."""
    rounded = {stage: round(seconds, 4) for stage, seconds in timings.items()}
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.timings = rounded
        if rounded:
            job.log += "\ntimings: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in rounded.items())


def _describe(result: StudyResult) -> list[str]:
    """Human-readable lines of what the pipeline did, for the job log."""
    m = result.model
    lines = [f"model {m.name} {m.version}" + (" (UNTRAINED DEMO MODEL: results are meaningless)" if m.demo else "")]
    counts: dict[str, int] = {}
    for outcome in result.instances:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
        if (
            outcome.state != InstanceState.DONE or outcome.reason
        ):  # a done instance's reason is a note (e.g. window not used)
            lines.append(f"instance {outcome.state}: {outcome.reason}")
    lines.insert(1, "instances: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for f in result.findings[:10]:
        lines.append(
            f"{f.label}: {f.probability:.3f} (threshold {f.threshold:.2f}) {'POSITIVE' if f.positive else 'negative'}"
        )
    return lines


def _record_findings(
    store: Store, job_id: int, result: StudyResult, lines: list[str], reporting: bool = False
) -> JobState:
    """Replace this job's instance results and findings with the new ones; return the job state.

    reporting: some instances were left out at the output stage (the failure, if none is left, names that stage)."""
    done = [o for o in result.instances if o.state == InstanceState.DONE]
    failed = [o for o in result.instances if o.state == InstanceState.FAILED]
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.model_name, job.model_version = result.model.name, result.model.version
        job.log = "\n".join(lines)
        session.execute(delete(InstanceResult).where(InstanceResult.job_id == job_id))
        session.execute(delete(FindingRow).where(FindingRow.job_id == job_id))
        for o in result.instances:
            session.add(
                InstanceResult(
                    job_id=job_id,
                    sop_instance_uid=o.sop_instance_uid,
                    state=InstanceState(o.state),
                    reason=o.reason,
                    probabilities=o.probabilities,
                )
            )
        if not done and not failed:
            job.log += "\nno instance matched the pipeline rules: nothing to report"
            return JobState.SKIPPED
    if not done:  # raised after the commit, so the per-instance reasons stay recorded
        # a retry reads the same files: the job fails at once
        what = "no instance could be analysed and reported" if reporting else "no instance could be analysed"
        reasons = "; ".join(sorted({o.reason for o in failed}))
        raise JobFailure("outputs" if reporting else "analyze", f"{what}: {reasons}", True)
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        m = result.model
        for rank, f in enumerate(result.findings):
            session.add(
                FindingRow(
                    job_id=job_id,
                    study_id=job.study_id,
                    label=f.label,
                    probability=float(f.probability),
                    threshold=float(f.threshold),
                    positive=bool(f.positive),
                    rank=rank,
                    source_sop_instance_uid=f.source_sop_instance_uid or "",
                    source_frame=f.source_frame,
                    model_name=m.name,
                    model_version=m.version,
                    model_sha256=m.sha256,
                    model_demo=m.demo,
                )
            )
        audit(
            session,
            "system",
            "job.findings",
            target=f"job:{job_id}",
            findings=len(result.findings),
            positive=len(result.positive),
        )
    return JobState.DONE


class _Written:
    """What the job log says about one output."""

    def __init__(self, kind: str, label: str, deliveries: int, notes: tuple[str, ...] = ()) -> None:
        self.kind, self.label, self.deliveries, self.notes = kind, label, deliveries, notes


def _write_outputs(
    store: Store,
    settings: Settings,
    job_id: int,
    study_id: int,
    result: StudyResult,
    sources: dict[str, Path],
    calling_aet: str,
    timings: dict[str, float] | None = None,
    strict: bool = False,
) -> list[_Written]:
    """Write the result objects, record them, and queue their deliveries (all idempotent); strict: see
    outputs.report.write_outputs."""

    used = {o.sop_instance_uid for o in result.instances if o.state == InstanceState.DONE}
    written = write_outputs(
        result,
        {uid: p for uid, p in sources.items() if uid in used},
        settings,
        settings.data_dir / "outputs",
        timings,
        strict=strict,
    )
    report: list[_Written] = []
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is not None:
            job.kinds = sorted(wanted_kinds(settings))
        for w in written:
            output = session.scalar(select(Output).where(Output.sop_instance_uid == w.sop_instance_uid))
            if output is None:
                output = Output(
                    job_id=job_id,
                    study_id=study_id,
                    kind=OutputKind(w.kind),
                    label=w.label,
                    sop_class_uid=w.sop_class_uid,
                    sop_instance_uid=w.sop_instance_uid,
                    series_instance_uid=w.series_instance_uid,
                    model_name=result.model.name,
                    model_version=result.model.version,
                    file_path=str(Path(w.path).resolve().relative_to(settings.data_dir)),
                    summary=w.summary,
                )
                session.add(output)
                session.flush()
                audit(session, "system", "output.written", target=f"output:{output.id}", kind=w.kind)
            deliveries = enqueue(session, output, settings, calling_aet, job_id)
            report.append(_Written(w.kind, w.label, len(deliveries), w.notes))
    return report

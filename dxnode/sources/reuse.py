"""A request naming destinations for a study analysed already: the results go to those destinations too.

worklist.queue.queue_retrieved hands back the study's existing job when nothing new arrived. Its
destinations then widen to the named ones (an empty list, "as configured", first becomes the names it
stood for), and:

- a queued or running job writes its outputs for them when it gets there (outbox.dispatch.enqueue reads
  the job's destinations as each output is written); outputs a running job wrote already get rows now;
- a done job's outputs get a delivery row for each named destination that wants their kind. A row is
  unique per output and destination, so the same request twice sends nothing twice, and a destination
  that had them already gets nothing again;
- a done job that was asked to write fewer kinds than the named destinations want is run again
  (worklist.queue.queued_job), for its study and model, with those destinations: its deterministic UIDs
  make the same objects again plus the missing kinds, and each destination gets each object once.

A different model than the one that ran is a different job (queue_retrieved looks for that model's).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from dxnode.config import Settings
from dxnode.outbox.dispatch import configured, destinations_for, enqueue
from dxnode.states import JobState, Priority
from dxnode.store import Job, Output, Study, audit
from dxnode.worklist.queue import queued_job


def _widened(settings: Settings, job: Job, aet: str, names: Sequence[str]) -> list[str]:
    """The job's destinations with the names added ([] stands for the configured ones it would get)."""
    before = set(job.destinations or []) or {d.name for d in destinations_for(settings, aet)}
    return sorted(before | set(names))


def deliver_also(session: Session, settings: Settings, job_id: int, names: Sequence[str], priority: Priority) -> int:
    """Send an existing job's results to the named destinations too; returns the job the request follows
    (a new one when the job must run again for kinds it did not write)."""
    job = session.get(Job, job_id)
    if job is None or not names:
        return job_id
    aet = session.scalar(select(Study.calling_aet).where(Study.id == job.study_id)) or ""
    job.destinations = _widened(settings, job, aet, names)
    if job.state == JobState.QUEUED:
        return job_id  # it writes its outputs for every destination it names
    wanted = {k for n in names if (d := configured(settings, n)) is not None for k in d.outputs}
    if job.state == JobState.DONE and job.kinds and not wanted <= set(job.kinds):
        rerun_id = queued_job(session, job.study_id, job.routed_model, priority)
        rerun = session.get(Job, rerun_id)
        assert rerun is not None
        rerun.destinations = _widened(settings, rerun, aet, job.destinations)
        missing = ", ".join(sorted(wanted - set(job.kinds)))
        audit(session, "system", "job.queued", target=f"job:{rerun_id}", rerun_of=f"job:{job_id}", kinds=missing)
        return rerun_id
    if not job.model_name:
        return job_id  # a running job that has written nothing yet
    outputs = session.scalars(
        select(Output).where(
            Output.study_id == job.study_id,
            Output.model_name == job.model_name,
            Output.model_version == job.model_version,
        )
    )
    for output in outputs:
        enqueue(session, output, settings, aet, job.id, list(names))
    return job_id

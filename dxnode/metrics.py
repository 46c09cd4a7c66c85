"""Prometheus metrics of the node, updated by the stages and served at /metrics.

Counters and histograms are counted where the event happens: the receiver and the outbox in the
node's own process, jobs in its job processes. ``dxnode serve`` and ``dxnode worker`` put every
process of the node on prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
dxnode.daemon before this module is first imported), so /metrics sums them all. Gauges that are a
count of rows (jobs by state, outbox backlog) are computed from the store at scrape time, so
several nodes sharing one database agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from dxnode.states import DeliveryState, JobState
from dxnode.store import Delivery, Instance, Job

if TYPE_CHECKING:
    from dxnode.store import Store

INSTANCES_RECEIVED = Counter(
    "dxnode_instances_received_total", "C-STORE instances stored and acknowledged", ["calling_aet"]
)
INSTANCES_DUPLICATE = Counter(
    "dxnode_instances_duplicate_total", "C-STORE instances already stored (acknowledged, not stored again)"
)
INSTANCES_REFUSED = Counter(
    "dxnode_instances_refused_total", "C-STORE requests answered with a failure status", ["status"]
)
BYTES_RECEIVED = Counter("dxnode_bytes_received_total", "Bytes of received instances written to disk")
ASSOCIATIONS_REJECTED = Counter(
    "dxnode_associations_rejected_total", "Associations rejected at A-ASSOCIATE time", ["reason"]
)
JOBS_FINISHED = Counter("dxnode_jobs_finished_total", "Jobs that ended, by final state", ["state"])
INFERENCE_SECONDS = Histogram(
    "dxnode_inference_seconds",
    "Model stage time per study (decode, window, forward, CAM)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
STAGES = ("decode", "decode_wait", "model", "cam", "sr", "sc", "write", "queued_to_done")
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def stage_histogram(timings: Iterable[dict[str, float]]) -> HistogramMetricFamily:
    """dxnode_stage_seconds{stage=...} over the timings stored on jobs.

    Built at scrape time from the store, like the job gauges: jobs run in their own processes
    (and on other nodes), whose in-process metrics no scrape of this one would see.
    """
    counts = {stage: [0] * len(STAGE_BUCKETS) for stage in STAGES}
    totals, sums = dict.fromkeys(STAGES, 0), dict.fromkeys(STAGES, 0.0)
    for job in timings:
        for stage, seconds in (job or {}).items():
            if stage in counts:
                totals[stage] += 1
                sums[stage] += float(seconds)
                for i, bound in enumerate(STAGE_BUCKETS):
                    counts[stage][i] += float(seconds) <= bound
    family = HistogramMetricFamily(
        "dxnode_stage_seconds",
        "Seconds per job spent in each stage: decode (summed over decoding threads), decode_wait (model idle "
        "waiting for decoded input), model, cam (heatmaps), sr, sc, write, queued_to_done",
        labels=["stage"],
    )
    for stage in STAGES:
        buckets = [(floatToGoString(b), counts[stage][i]) for i, b in enumerate(STAGE_BUCKETS)]
        family.add_metric([stage], [*buckets, ("+Inf", totals[stage])], sums[stage])
    return family


DELIVERIES_SENT = Counter("dxnode_deliveries_sent_total", "Outputs delivered to a destination", ["destination"])
DELIVERY_ATTEMPTS_FAILED = Counter(
    "dxnode_delivery_attempts_failed_total",
    "Delivery attempts that failed, each retry counted (most are retried: see dxnode_deliveries_failed_for_good_total)",
    ["destination"],
)
DELIVERIES_FAILED_FOR_GOOD = Counter(
    "dxnode_deliveries_failed_for_good_total",
    "Deliveries given up (max_attempts reached or refused for good): the outbox rows that turned failed",
    ["destination"],
)
STUDIES_PURGED = Counter(
    "dxnode_studies_purged_total",
    "Studies whose received instances were purged by this node's process ([retention]; `dxnode purge` is in the audit)",
    ["reason"],
)
UPS_WORKITEMS = Counter(
    "dxnode_ups_workitems_total",
    "UPS workitems of a [[ups]] Task Manager by what the node did: claimed, refused, completed, canceled, gone",
    ["ups", "outcome"],
)
UPS_UNREACHABLE = Counter(
    "dxnode_ups_unreachable_total", "Rounds a [[ups]] Task Manager could not be reached (retried with backoff)", ["ups"]
)

# Export the labelled series at zero from the start, so dashboards and alerts see them before the first event.
ASSOCIATIONS_REJECTED.labels(reason="calling_aet")
for _state in (JobState.DONE, JobState.FAILED, JobState.SKIPPED):
    JOBS_FINISHED.labels(state=_state)
for _reason in ("age", "quota", "space", "results", "reconcile"):
    STUDIES_PURGED.labels(reason=_reason)


def store_families(store: Store) -> list[Metric]:
    """The figures read from the database at scrape time: jobs by state, outbox backlog and failures,
    stage times. Families, not Gauge objects: those would write multiprocess files of their own."""

    jobs = GaugeMetricFamily("dxnode_jobs", "Jobs by state", labels=["state"])
    with store.session() as s:
        counts = dict.fromkeys(JobState, 0) | dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state, n in counts.items():
            jobs.add_metric([str(state)], n)

        def deliveries(state: DeliveryState) -> int:
            return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == state)) or 0

        backlog = GaugeMetricFamily(
            "dxnode_outbox_backlog", "Deliveries pending", value=deliveries(DeliveryState.PENDING)
        )
        failed = GaugeMetricFamily(
            "dxnode_outbox_failed",
            "Deliveries failed for good (outbox rows now failed)",
            value=deliveries(DeliveryState.FAILED),
        )
        stages = stage_histogram(s.scalars(select(Job.timings)))
        stored = GaugeMetricFamily(
            "dxnode_stored_bytes",
            "Bytes of received instances kept on disk (the [retention] quota counts these)",
            value=s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)).where(Instance.purging.is_(False)))
            or 0,
        )
    return [jobs, backlog, failed, stages, stored]


class _Families:
    """Metric families computed at scrape time, as a collector for a CollectorRegistry."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def exposition(store: Store | None, multiproc_dir: Path | None) -> bytes:
    """The text of /metrics: the counters of every process of this node (summed from multiproc_dir,
    or this process's own when None), this process's CPU and memory, and the database's figures."""
    if multiproc_dir is None:
        text = generate_latest(REGISTRY)
    else:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(multiproc_dir))
        ProcessCollector(registry=registry)
        text = generate_latest(registry)
    if store is not None:
        registry = CollectorRegistry()
        registry.register(_Families(store_families(store)))
        text += generate_latest(registry)
    return text


# Storage Commitment (destinations with commitment = true; dxnode/outbox/commitment.py).
DELIVERIES_COMMITTED = Counter(
    "dxnode_deliveries_committed_total",
    "Deliveries a destination's Storage Commitment report confirmed it keeps",
    ["destination"],
)
COMMITMENT_FAILED_REFERENCES = Counter(
    "dxnode_commitment_failed_references_total",
    "Objects a destination reported it could not commit (each is sent again)",
    ["destination"],
)
COMMITMENT_TIMEOUTS = Counter(
    "dxnode_commitment_timeouts_total",
    "Storage Commitment requests with no report within commitment_timeout (alert: asked again)",
    ["destination"],
)
RECEIVE_COMMIT_BATCH = Histogram(
    "dxnode_receive_commit_batch",
    "Received instances made durable by one database commit and one folder fsync per folder (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)

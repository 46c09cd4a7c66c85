"""Prometheus metrics of the node, updated by the stages and served at /metrics.

Gauges that are a count of rows (jobs by state, outbox backlog) are computed from the store at
scrape time by the web stage, so several processes sharing one database agree.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from dxnode.states import JobState

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
DELIVERIES_SENT = Counter("dxnode_deliveries_sent_total", "Outputs delivered to a destination", ["destination"])
DELIVERIES_FAILED = Counter("dxnode_deliveries_failed_total", "Delivery attempts that failed", ["destination"])

# Export the labelled series at zero from the start, so dashboards and alerts see them before the first event.
ASSOCIATIONS_REJECTED.labels(reason="calling_aet")
for _state in (JobState.DONE, JobState.FAILED, JobState.SKIPPED):
    JOBS_FINISHED.labels(state=_state)

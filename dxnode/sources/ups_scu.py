"""The DIMSE calls of the UPS task performer (dxnode/sources/ups.py) to a [[ups]] Task Manager.

Every workitem operation (C-FIND, N-GET, N-SET, N-ACTION Change State) goes over an association that
proposes only the UPS Pull SOP Class: PS3.4 CC.2 asks for Pull even for workitems created with UPS
Push, whose SOP Class UID is the Requested SOP Class UID of every UPS message (pynetdicom picks the
Pull context for it, see pynetdicom #509). Subscribing goes over UPS Watch. A Task Manager that cannot
be reached, or that does not answer, raises UpsDown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time from a table
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
    UPSGlobalSubscriptionInstance,
)

from dxnode.config import Settings, UpsEntry
from dxnode.outbox.dispatch import tls_client_context

log = logging.getLogger("dxnode.sources.ups")

CHANGE_STATE, SUBSCRIBE = 1, 3  # N-ACTION Action Type IDs (PS3.4 CC.2.1, CC.2.2)
PENDING = (0xFF00, 0xFF01)
ALREADY_IN_PROGRESS = 0xC302  # also the answer to a claim sent again with the same Transaction UID
NO_SUCH_INSTANCE = 0xC307
# Statuses of Change State, Request Cancel, N-SET and Subscribe (PS3.4 Tables CC.2.1-2, CC.2.2-2,
# CC.2.3-3, CC.2.6-1), for the log and the table.
STATUS_TEXT = {
    0x0001: "optional attributes not supported",
    0xB301: "deletion lock not granted",
    0xB304: "already CANCELED",
    0xB305: "coerced invalid values to valid values",
    0xB306: "already COMPLETED",
    0xC300: "the workitem may no longer be updated",
    0xC301: "wrong Transaction UID",
    0xC302: "already IN PROGRESS",
    0xC303: "may only become SCHEDULED by N-CREATE",
    0xC304: "final state requirements not met",
    0xC307: "no such workitem",
    0xC308: "Receiving AE unknown to the Task Manager",
    0xC310: "not IN PROGRESS",
    0xC311: "already COMPLETED",
    0xC312: "the performer cannot be contacted",
    0xC313: "the performer chooses not to cancel",
    0xC314: "action not appropriate for this instance",
    0xC315: "the Task Manager does not support event reports",
    0x0105: "no such attribute (not allowed in N-SET)",
    0x0106: "invalid attribute value",
    0x0121: "missing attribute value",
    0x0123: "no such action (over this SOP Class)",
    0x0110: "processing failure",
}
# What the performer asks of each workitem in the C-FIND (its match keys are checked here as well).
FIND_KEYS = (
    "SOPInstanceUID",
    "ProcedureStepState",
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "ScheduledWorkitemCodeSequence",
    "ScheduledStationNameCodeSequence",
    "InputInformationSequence",
)


class UpsDown(Exception):
    """The Task Manager could not be reached or did not answer: retried after a backoff."""


def accepted(status: int) -> bool:
    """Success or a warning: the N-SET or Change State was carried out (PS3.4: 0x0001 optional attributes
    not supported, 0xB305 values coerced, 0xB304/0xB306 already CANCELED/COMPLETED)."""
    return status in (0x0000, 0x0001) or 0xB000 <= status <= 0xBFFF


def describe(status: int | None) -> str:
    """'0xC301 (wrong Transaction UID)' for a status."""
    if status is None:
        return "no answer"
    text = STATUS_TEXT.get(status, "")
    return f"0x{status:04X}" + (f" ({text})" if text else "")


def _where(entry: UpsEntry) -> str:
    return f"{entry.ae_title}@{entry.host}:{entry.port}"


@contextmanager
def _association(settings: Settings, entry: UpsEntry, context: str) -> Iterator[Association]:
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = entry.timeout_seconds
    ae.connection_timeout = entry.timeout_seconds
    tls_args = (tls_client_context(settings, entry.host), entry.host) if entry.tls else None
    try:
        assoc = ae.associate(entry.host, entry.port, ae_title=entry.ae_title, tls_args=tls_args)
    except Exception as exc:
        raise UpsDown(f"cannot associate with {_where(entry)}: {exc}") from None
    if not assoc.is_established:
        raise UpsDown(f"association with {_where(entry)} {'rejected' if assoc.is_rejected else 'refused or aborted'}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def pull(settings: Settings, entry: UpsEntry) -> AbstractContextManager[Association]:
    """An association proposing UPS Pull only (UpsDown when it cannot be made)."""
    return _association(settings, entry, UnifiedProcedureStepPull)


def _status(rsp: Dataset | None) -> int | None:
    code = getattr(rsp, "Status", None) if rsp is not None else None
    return int(code) if code is not None else None


def _answered(status: int | None, what: str, entry: UpsEntry) -> int:
    if status is None:
        raise UpsDown(f"{what}: no answer from {_where(entry)} in {entry.timeout_seconds:g} s")
    return status


def find_scheduled(assoc: Association, entry: UpsEntry) -> list[Dataset]:
    """C-FIND over UPS Pull for SCHEDULED workitems (the [[ups]] match rules are applied by the caller)."""
    query = Dataset()
    for key in FIND_KEYS:
        setattr(query, key, DicomSequence() if key.endswith("Sequence") else "")
    query.ProcedureStepState = "SCHEDULED"
    found: list[Dataset] = []
    for rsp, identifier in assoc.send_c_find(query, UnifiedProcedureStepPull):
        status = _answered(_status(rsp), "C-FIND", entry)
        if status in PENDING and identifier is not None:
            found.append(identifier)
        elif status not in PENDING and status != 0:
            raise UpsDown(f"C-FIND refused by {_where(entry)}: {describe(status)}")
    return found


def change_state(assoc: Association, entry: UpsEntry, uid: str, state: str, transaction_uid: str) -> int:
    """N-ACTION Change State (Action Type 1) of a workitem; returns the status."""
    info = Dataset()
    info.ProcedureStepState = state
    info.TransactionUID = transaction_uid
    rsp, _ = assoc.send_n_action(info, CHANGE_STATE, UnifiedProcedureStepPush, uid)
    return _answered(_status(rsp), f"N-ACTION {state} of {uid}", entry)


def n_set(assoc: Association, entry: UpsEntry, uid: str, changes: Dataset) -> int:
    """N-SET of a workitem's attributes (changes carries the Transaction UID); returns the status."""
    rsp, _ = assoc.send_n_set(changes, UnifiedProcedureStepPush, uid)
    return _answered(_status(rsp), f"N-SET of {uid}", entry)


def n_get(assoc: Association, entry: UpsEntry, uid: str, keywords: list[str]) -> tuple[int, Dataset]:
    """N-GET of some of a workitem's attributes: (status, what came back; empty when nothing)."""
    tags = [Tag(k) for k in keywords]  # pydicom reads a keyword as its tag
    rsp, ds = assoc.send_n_get(tags, UnifiedProcedureStepPush, uid)
    return _answered(_status(rsp), f"N-GET of {uid}", entry), ds if ds is not None else Dataset()


def state_of(assoc: Association, entry: UpsEntry, uid: str) -> tuple[int, str]:
    """N-GET of a workitem's Procedure Step State: (status, state; "" when not answered with one)."""
    # Two tags: pynetdicom reads a list of one back as a single tag, which some of its SCPs trip on.
    status, ds = n_get(assoc, entry, uid, ["ProcedureStepState", "ProcedureStepProgressInformationSequence"])
    return status, str(ds.get("ProcedureStepState", "") or "")


def subscribe(settings: Settings, entry: UpsEntry) -> int:
    """N-ACTION Subscribe (Action Type 3) to every workitem's events, over UPS Watch; returns the status.

    The events come to the node's own AE title, on its DICOM listener (the Task Manager must know its
    address). PS3.4 CC.2.3 offers three subscriptions; the node keeps the global one (well-known UID
    1.2.840.10008.5.1.4.34.5) because:
    - a per-workitem subscription needs the workitem's UID, so it cannot announce new SCHEDULED
      workitems, which is what the events are for here (the node's claimed workitems are watched by
      N-GET each round anyway);
    - the Filtered Global Subscription (1.2.840.10008.5.1.4.34.5.1) is optional for a Task Manager (one
      without it answers 0xC307), and the node's match rules (any of several codes) are applied to the
      C-FIND answers in any case; an event only wakes a round, so unmatched ones cost one C-FIND.
    Deletion Lock FALSE: a lock asks the Task Manager to keep every COMPLETED or CANCELED workitem until
    the node releases it, and the node needs nothing from a finished workitem (what it did is in its
    ups_workitem table); a node that went away would leave the locks behind (PS3.17 GGG.1)."""
    info = Dataset()
    info.ReceivingAE = settings.node.ae_title
    info.DeletionLock = "FALSE"
    with _association(settings, entry, UnifiedProcedureStepWatch) as assoc:
        rsp, _ = assoc.send_n_action(info, SUBSCRIBE, UnifiedProcedureStepPush, UPSGlobalSubscriptionInstance)
        return _answered(_status(rsp), "N-ACTION subscribe", entry)

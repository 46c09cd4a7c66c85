"""A UPS provider (an IHE AIW-I Task Manager) for the tests, on pynetdicom's UPS service class.

No open-source UPS server is packaged, so this one keeps workitems in a dict and enforces what
PS3.4 CC.2 asks of a provider: the state machine (SCHEDULED -> IN PROGRESS -> COMPLETED or CANCELED),
the Transaction UID rule (only the performer that claimed a workitem may change it: 0xC301), and that
Change State comes over UPS Pull (over UPS Push it answers 0x0123, no such action). Its N-SET and final
state checks follow PS3.4 Table CC.2.5-3 and dcm4chee-arc-light's UPS service (set-iod.xml,
UPSServiceEJB.updateUPS / changeUPSState / meetFinalStateRequirementsOfCompleted):
- N-SET: an attribute N-SET may not change (Not allowed) is refused 0x0105, an empty Type 1 value in a
  code item or an output reference 0x0121, non-ASCII text without Specific Character Set 0x0106; a
  Transaction UID on a SCHEDULED workitem 0xC310, a wrong or missing one on IN PROGRESS 0xC301, any
  N-SET on COMPLETED or CANCELED 0xC300;
- COMPLETED (codes R and P) and CANCELED (R and X) are refused 0xC304 unless met (final_state_missing);
  a missing Procedure Step Cancellation DateTime is filled, as PS3.4 asks, and noted in supplemented.
It records every operation with the SOP Class of the context it came over, and sends UPS Event reports
(N-EVENT-REPORT) to its subscribers.
"""

from __future__ import annotations

import datetime
import threading
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from conftest import free_port
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)

CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE = 1, 2, 3
STATE_REPORT, CANCEL_REQUESTED = 1, 2
NO_SUCH_ACTION, WRONG_TRANSACTION, ALREADY_IN_PROGRESS = 0x0123, 0xC301, 0xC302
FINAL_NOT_MET, NO_SUCH_WORKITEM, NOT_IN_PROGRESS = 0xC304, 0xC307, 0xC310
NO_LONGER_UPDATABLE, NO_SUCH_ATTRIBUTE, INVALID_VALUE, MISSING_VALUE = 0xC300, 0x0105, 0x0106, 0x0121
# Table CC.2.5-3, N-SET column "Not allowed" (and "-" for the SCU: the SCP keeps the modification time).
NOT_SETTABLE = frozenset(
    [
        "SOPClassUID",
        "SOPInstanceUID",
        "ProcedureStepState",
        "ScheduledProcedureStepModificationDateTime",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "PatientBirthDate",
        "PatientSex",
        "AdmissionID",
        "IssuerOfAdmissionIDSequence",
        "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence",
        "ReferencedRequestSequence",
        "ReplacedProcedureStepSequence",
    ]
)
# Final State code R (both final states) of the attributes a workitem is created with.
FINAL_R = (
    "SOPClassUID",
    "SOPInstanceUID",
    "ScheduledProcedureStepPriority",
    "ScheduledProcedureStepModificationDateTime",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
)
RETRIEVAL = ("DICOMRetrievalSequence", "DICOMMediaRetrievalSequence", "WADORetrievalSequence")
RETRIEVAL += ("XDSRetrievalSequence", "WADORSRetrievalSequence")


@dataclass(frozen=True)
class Operation:
    """One request the provider answered."""

    kind: str  # "N-CREATE", "C-FIND", "N-ACTION 1" (change state) ...
    uid: str
    context: str  # the abstract syntax of the presentation context it came over
    status: int
    detail: str = ""  # the state asked for, or the keywords set
    calling: str = ""  # the calling AE title


def workitem(study_uid: str, *, code: str = "AI-CXR", priority: str = "MEDIUM", retrieve_ae: str = "") -> Dataset:
    """An N-CREATE attribute list: a SCHEDULED workitem with one input study."""
    ds = Dataset()
    ds.TransactionUID = ""
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = priority
    ds.ProcedureStepLabel = f"AI on {study_uid[-8:]}"
    ds.WorklistLabel = "AI"
    ds.ScheduledProcedureStepStartDateTime = "20260101120000"
    ds.InputReadinessState = "READY"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "99TEST", "AI chest"
    ds.ScheduledWorkitemCodeSequence = [item]
    inp = Dataset()
    inp.TypeOfInstances = "DICOM"
    inp.StudyInstanceUID, inp.SeriesInstanceUID = study_uid, generate_uid()
    inp.ReferencedSOPSequence = []
    retrieval = Dataset()
    retrieval.RetrieveAETitle = retrieve_ae
    inp.DICOMRetrievalSequence = [retrieval]
    ds.InputInformationSequence = [inp]
    ds.PatientName, ds.PatientID = "Ups^Test", "PAT-UPS"
    return ds


class UpsProvider:
    """The Task Manager: a UPS SCP (Push, Pull, Watch, Event) on a free port."""

    def __init__(self, subscribers: dict[str, tuple[str, int]], ae_title: str = "TASKMGR") -> None:
        self.ae_title, self.port = ae_title, free_port()
        self.items: dict[str, Dataset] = {}
        self.operations: list[Operation] = []
        self.subscribers: dict[str, tuple[str, int]] = subscribers  # AE title -> address
        self.subscribed: set[str] = set()
        self.stale_find: set[str] = set()  # reported SCHEDULED by C-FIND whatever their state (a race)
        self.on_claim: dict[str, str] = {}
        self.bare_find = False  # leave the Input Information Sequence out of C-FIND answers (some do)  # uid -> "delete" or "cancel": what happens once it is claimed
        self.set_answer = 0  # the status of an accepted N-SET: 0x0001 or 0xB305 are warnings PS3.4 allows
        self.supplemented: list[tuple[str, str]] = []  # (uid, keyword) the provider had to fill at a final state
        self.lock = threading.RLock()
        ae = AE(ae_title)
        for cx in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch):
            ae.add_supported_context(cx)
        handlers = [
            (evt.EVT_N_CREATE, self._create),
            (evt.EVT_C_FIND, self._find),
            (evt.EVT_N_ACTION, self._action),
            (evt.EVT_N_SET, self._set),
            (evt.EVT_N_GET, self._get),
        ]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        self.server.shutdown()

    def _record(self, event: Any, kind: str, uid: str, status: int, detail: str = "") -> int:
        calling = str(event.assoc.requestor.ae_title)
        with self.lock:
            self.operations.append(Operation(kind, uid, str(event.context.abstract_syntax), status, detail, calling))
        return status

    def state(self, uid: str) -> str:
        with self.lock:
            item = self.items.get(uid)
            return str(item.ProcedureStepState) if item is not None else ""

    def item(self, uid: str) -> Dataset:
        with self.lock:
            return deepcopy(self.items[uid])

    def ops(self, kind: str, uid: str = "") -> list[Operation]:
        with self.lock:
            return [op for op in self.operations if op.kind == kind and (not uid or op.uid == uid)]

    # --- handlers --------------------------------------------------------------------------------

    def _create(self, event: Any) -> tuple[int, Dataset | None]:
        ds = event.attribute_list
        uid = str(event.request.AffectedSOPInstanceUID or generate_uid())
        if ds.get("ProcedureStepState") != "SCHEDULED":
            return self._record(event, "N-CREATE", uid, 0xC309), None
        ds.SOPClassUID, ds.SOPInstanceUID = UnifiedProcedureStepPush, uid
        ds.ScheduledProcedureStepModificationDateTime = _now()
        with self.lock:
            self.items[uid] = ds
        return self._record(event, "N-CREATE", uid, 0), ds

    def _find(self, event: Any) -> Any:
        query = event.identifier
        state = str(query.get("ProcedureStepState", "") or "")
        with self.lock:
            found = [
                deepcopy(ds)
                for uid, ds in self.items.items()
                if not state or ds.ProcedureStepState == state or uid in self.stale_find
            ]
        for ds in found:
            if ds.SOPInstanceUID in self.stale_find:
                ds.ProcedureStepState = "SCHEDULED"  # a C-FIND answered just before another performer's claim
        self._record(event, "C-FIND", "", 0, state)
        for ds in found:
            answer = Dataset()
            for elem in query:
                if self.bare_find and elem.keyword == "InputInformationSequence":
                    continue
                if elem.keyword in ds:
                    answer[elem.tag] = ds[elem.tag]
                else:
                    answer[elem.tag] = elem
            answer.SOPInstanceUID = ds.SOPInstanceUID
            yield 0xFF00, answer

    def _get(self, event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        with self.lock:
            item = self.items.get(uid)
            if item is None:
                return self._record(event, "N-GET", uid, NO_SUCH_WORKITEM), None
            out = Dataset()
            tags = event.request.AttributeIdentifierList or []
            for tag in tags if isinstance(tags, list) else [tags]:  # one tag is read back as a single value
                if tag in item:
                    out[tag] = deepcopy(item[tag])
        return self._record(event, "N-GET", uid, 0), out

    def _set(self, event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        changes = event.modification_list
        keys = ",".join(e.keyword for e in changes)
        with self.lock:
            item = self.items.get(uid)
            status = NO_SUCH_WORKITEM if item is None else _set_refused(item, changes)
            if item is None or status:
                return self._record(event, "N-SET", uid, status, keys), None
            for elem in changes:
                if elem.keyword != "TransactionUID":
                    item[elem.tag] = deepcopy(elem)
            item.ScheduledProcedureStepModificationDateTime = _now()
        return self._record(event, "N-SET", uid, self.set_answer, keys), changes

    def _action(self, event: Any) -> tuple[int, Dataset | None]:
        kind, uid = int(event.action_type), str(event.request.RequestedSOPInstanceUID)
        info = event.action_information
        if kind == SUBSCRIBE:
            with self.lock:
                self.subscribed.add(str(info.ReceivingAE).strip())
            return self._record(event, "N-ACTION 3", uid, 0), None
        if kind == REQUEST_CANCEL:
            by, reason = str(event.assoc.requestor.ae_title), str(info.get("ReasonForCancellation", "") or "")
            return self._record(event, "N-ACTION 2", uid, self.request_cancel(uid, by, reason)), None
        wanted = str(info.get("ProcedureStepState", ""))
        if kind != CHANGE_STATE or event.context.abstract_syntax != UnifiedProcedureStepPull:
            return self._record(event, f"N-ACTION {kind}", uid, NO_SUCH_ACTION, wanted), None
        status, after = self._change(uid, wanted, str(info.get("TransactionUID", "")))
        self._record(event, "N-ACTION 1", uid, status, wanted)
        if status == 0:  # after the answer, as a Task Manager would: the reports on associations of their own

            def later() -> None:
                self._report(uid, STATE_REPORT)
                if after:
                    after()

            threading.Thread(target=later, daemon=True).start()
        return status, None

    def _change(self, uid: str, wanted: str, transaction: str) -> tuple[int, Any]:
        """Apply a Change State; (status, what to do after answering)."""
        with self.lock:
            item = self.items.get(uid)
            if item is None:
                return NO_SUCH_WORKITEM, None
            now = str(item.ProcedureStepState)
            if wanted == "IN PROGRESS":
                if now == "IN PROGRESS":
                    return ALREADY_IN_PROGRESS, None  # whoever asks, as dcm4chee-arc (PS3.4 has no other status)
                if now != "SCHEDULED":
                    return 0xC300, None
                item.ProcedureStepState, item.TransactionUID = "IN PROGRESS", transaction
                then = self.on_claim.get(uid)
                if then == "delete":
                    return 0, lambda: self.delete(uid)
                if then == "cancel":
                    return 0, lambda: self.request_cancel(uid)
                return 0, None
            if now != "IN PROGRESS":
                return NOT_IN_PROGRESS, None
            if transaction != item.TransactionUID:
                return WRONG_TRANSACTION, None
            if wanted not in ("COMPLETED", "CANCELED"):
                return 0xC303, None
            if final_state_missing(item, wanted):
                return FINAL_NOT_MET, None
            if wanted == "CANCELED":
                self._fill_cancellation(uid, item)
            item.ProcedureStepState = wanted
            return 0, None

    def _fill_cancellation(self, uid: str, item: Dataset) -> None:
        """PS3.4: a CANCELED workitem without Procedure Step Cancellation DateTime gets the current time."""
        info = item.ProcedureStepProgressInformationSequence[0]
        if not info.get("ProcedureStepCancellationDateTime"):
            info.ProcedureStepCancellationDateTime = _now()
            self.supplemented.append((uid, "ProcedureStepCancellationDateTime"))

    # --- what the Task Manager's users do --------------------------------------------------------

    def delete(self, uid: str) -> None:
        with self.lock:
            self.items.pop(uid, None)

    def request_cancel(self, uid: str, by: str = "RIS", reason: str = "asked by a user of the Task Manager") -> int:
        """A user asks to cancel: a SCHEDULED workitem is CANCELED, an IN PROGRESS one's performer told."""
        with self.lock:
            item = self.items.get(uid)
            if item is None:
                return NO_SUCH_WORKITEM
            if item.ProcedureStepState == "SCHEDULED":
                item.ProcedureStepState = "CANCELED"
                return 0
        cancel = Dataset()  # Table CC.2.4-1: Requesting AE, and the reason when the request gave one
        cancel.RequestingAE = by
        if reason:
            cancel.ReasonForCancellation = reason
        self._report(uid, CANCEL_REQUESTED, cancel)
        return 0

    def _report(self, uid: str, event_type: int, cancel: Dataset | None = None) -> None:
        """N-EVENT-REPORT to each subscriber, on an association of its own (this side proposes the SCP role)."""
        with self.lock:
            item = self.items.get(uid)
            targets = [self.subscribers[a] + (a,) for a in sorted(self.subscribed) if a in self.subscribers]
        info = cancel if cancel is not None else Dataset()
        if event_type == STATE_REPORT and item is not None:
            info.ProcedureStepState, info.InputReadinessState = item.ProcedureStepState, "READY"
        for host, port, aet in targets:
            ae = AE(self.ae_title)
            ae.add_requested_context(UnifiedProcedureStepEvent)
            assoc = ae.associate(
                host, port, ae_title=aet, ext_neg=[build_role(UnifiedProcedureStepEvent, scp_role=True)]
            )
            if assoc.is_established:
                assoc.send_n_event_report(info, event_type, UnifiedProcedureStepPush, uid)
                assoc.release()

    def create(self, ds: Dataset, ae_title: str = "RIS") -> str:
        """N-CREATE a workitem over UPS Push, as a RIS would; its UID."""
        uid = generate_uid()
        ae = AE(ae_title)
        ae.add_requested_context(UnifiedProcedureStepPush)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
        assert assoc.is_established
        try:
            rsp, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, uid)
            assert rsp.Status == 0, rsp
        finally:
            assoc.release()
        return uid


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")


def _set_refused(item: Dataset, changes: Dataset) -> int:
    """The status an N-SET is refused with (0: accepted): the state and Transaction UID rules, then the
    attributes (PS3.4 CC.2.6.3; dcm4chee-arc UPSServiceEJB.updateUPS and set-iod.xml)."""
    state, transaction = str(item.ProcedureStepState), changes.get("TransactionUID")
    if state in ("COMPLETED", "CANCELED"):
        return NO_LONGER_UPDATABLE
    if state == "SCHEDULED" and transaction is not None:
        return NOT_IN_PROGRESS
    if state == "IN PROGRESS" and (not transaction or transaction != item.TransactionUID):
        return WRONG_TRANSACTION
    if any(elem.keyword in NOT_SETTABLE for elem in changes):
        return NO_SUCH_ATTRIBUTE
    if "SpecificCharacterSet" not in changes and not all(text.isascii() for text in _texts(changes)):
        return INVALID_VALUE
    return MISSING_VALUE if type1_missing(changes) else 0


def _texts(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds:
        if elem.VR == "SQ":
            out.extend(text for item in elem.value for text in _texts(item))
        elif isinstance(elem.value, str):
            out.append(elem.value)
    return out


def code_missing(item: Dataset) -> str:
    """What an item of a code sequence lacks (UPS Code Sequence Macro, all Type 1 / 1C); "" when complete."""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    if not value:
        return "CodeValue"
    if not item.get("CodingSchemeDesignator") and not item.get("URNCodeValue"):
        return "CodingSchemeDesignator"
    return "" if item.get("CodeMeaning") else "CodeMeaning"


def reference_missing(item: Dataset) -> str:
    """What an Output Information Sequence item lacks (Referenced Instances and Access Macro); "" when complete."""
    refs = item.get("ReferencedSOPSequence", None) or []
    if not item.get("TypeOfInstances") or not refs:
        return "TypeOfInstances" if not item.get("TypeOfInstances") else "ReferencedSOPSequence"
    if item.TypeOfInstances == "DICOM" and not (item.get("StudyInstanceUID") and item.get("SeriesInstanceUID")):
        return "StudyInstanceUID"
    if any(not (r.get("ReferencedSOPClassUID") and r.get("ReferencedSOPInstanceUID")) for r in refs):
        return "ReferencedSOPInstanceUID"
    where = [seq for seq in RETRIEVAL if item.get(seq, None)]
    if not where:
        return "DICOMRetrievalSequence"  # one way to retrieve them at least
    for seq in where:
        for sub in item[seq].value:
            if not any(
                sub.get(k)
                for k in (
                    "RetrieveAETitle",
                    "RetrieveURL",
                    "RetrieveURI",
                    "StorageMediaFileSetUID",
                    "RepositoryUniqueID",
                )
            ):
                return f"{seq} item"
    return ""


def type1_missing(ds: Dataset) -> str:
    """The first empty Type 1 value in the code items and output references of an N-SET; "" when none."""
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            missing = (
                code_missing(item)
                if elem.keyword.endswith("CodeSequence")
                else reference_missing(item)
                if elem.keyword == "OutputInformationSequence"
                else type1_missing(item)
            )
            if missing:
                return f"{elem.keyword} > {missing}"
    return ""


def final_state_missing(item: Dataset, state: str) -> str:
    """What keeps a workitem from COMPLETED or CANCELED (Table CC.2.5-3 Final State codes R, P, X); "" when met.

    COMPLETED is checked as dcm4chee-arc does (a Performed Procedure item with start and end and complete
    Performed Station Name and Performed Workitem codes) plus the Output Information Sequence (P, Type 2:
    present, possibly with no items); CANCELED needs the Discontinuation Reason Code (X), while the
    Cancellation DateTime (X) is filled by the provider when absent, as PS3.4 asks of the SCP."""
    for keyword in FINAL_R:
        if not item.get(keyword):
            return keyword
    if state == "CANCELED":
        info = (item.get("ProcedureStepProgressInformationSequence", None) or [None])[0]
        if info is None:
            return "ProcedureStepProgressInformationSequence"
        reason = (info.get("ProcedureStepDiscontinuationReasonCodeSequence", None) or [None])[0]
        return "ProcedureStepDiscontinuationReasonCodeSequence" if reason is None or code_missing(reason) else ""
    performed = (item.get("UnifiedProcedureStepPerformedProcedureSequence", None) or [None])[0]
    if performed is None:
        return "UnifiedProcedureStepPerformedProcedureSequence"
    for keyword in ("PerformedProcedureStepStartDateTime", "PerformedProcedureStepEndDateTime"):
        if not performed.get(keyword):
            return keyword
    for keyword in ("PerformedStationNameCodeSequence", "PerformedWorkitemCodeSequence"):
        code = (performed.get(keyword, None) or [None])[0]
        if code is None or code_missing(code):
            return keyword
    return "" if "OutputInformationSequence" in performed else "OutputInformationSequence"


def change_state_over(port: int, context: str, uid: str, state: str, transaction: str, aet: str = "OTHER") -> int:
    """A Change State from another SCU over the given context only; the status."""
    ae = AE(aet)
    ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="TASKMGR")
    assert assoc.is_established
    try:
        info = Dataset()
        info.ProcedureStepState, info.TransactionUID = state, transaction
        rsp, _ = assoc.send_n_action(info, CHANGE_STATE, UnifiedProcedureStepPush, uid)
        return int(rsp.Status)
    finally:
        assoc.release()

"""What a result says to an HL7 destination: a job's findings read from the store, and the ORU^R01 of them.

The ORU^R01 (v2.5.1) has PID, ORC (RE), OBR (the order's procedure, else "AI analysis"; its accession
number in OBR-18), an NTE saying the result is AI-generated (and from an untrained demo model when it
is), one OBX per finding and one with the Study Instance UID (113014, DCM). A finding's OBX: value type
NM, OBX-3 the label (coding system 99DXNODE), OBX-5 the probability, OBX-6 unit "1" (UCUM), OBX-7 the
reference range ``<threshold``, OBX-8 ``A`` when at or above the threshold (positive) else ``N``,
OBX-11 ``F`` (``C`` here and in OBR-25 when an earlier job's result for the study went to the same
destination: the study was analysed again), OBX-17 the AI-generated flag ``AIAST`` (HL7 v3
ObservationValue "Artificial Intelligence asserted", the code FHIR puts in meta.security) and
OBX-18 the model's name and version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dxnode.config import Hl7Destination, Settings
from dxnode.hl7.v2 import escape, msh, timestamp
from dxnode.states import DeliveryState
from dxnode.store import FindingRow, Hl7Order, Hl7Result, Job, Study

LABEL_SYSTEM = "99DXNODE"  # the coding system of the labels: local to the model (HL7 "99zzz")
AI_FLAG = "AIAST^Artificial Intelligence asserted^v3-ObservationValue"
STUDY_UID_CODE = "113014^DICOM Study^DCM"


@dataclass(frozen=True)
class StoredFinding:
    """One label's study-level result as the store keeps it (a finding row), for the ORU and FHIR content."""

    label: str
    probability: float
    threshold: float
    positive: bool


@dataclass(frozen=True)
class Report:
    """A done job's findings and what identifies them, read from the store for the senders."""

    job_id: int
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    modalities: str
    model_name: str
    model_version: str
    model_demo: bool
    finished_at: dt.datetime
    findings: tuple[StoredFinding, ...]
    placer_order: str = ""
    filler_order: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    corrected: bool = False  # an earlier job's result for this study already went to this destination

    @property
    def status(self) -> str:
        """OBR-25 and OBX-11: F (final), or C (corrected) for a study analysed again."""
        return "C" if self.corrected else "F"

    @property
    def disclaimer(self) -> str:
        """The line every result carries about where it came from."""
        text = f"AI-generated result (model {self.model_name} {self.model_version}); not a diagnosis."
        if self.model_demo:
            text += " UNTRAINED DEMO MODEL: its findings are meaningless."
        return text


def load_report(session: Session, job_id: int, order_id: int | None, destination: str = "") -> Report | None:
    """The report of a job (None when the job or its study is gone); corrected when an earlier job's
    result for the same study was sent to destination."""
    job = session.get(Job, job_id)
    study = session.get(Study, job.study_id) if job is not None else None
    if job is None or study is None:
        return None
    rows = session.scalars(select(FindingRow).where(FindingRow.job_id == job_id).order_by(FindingRow.rank)).all()
    order = session.get(Hl7Order, order_id) if order_id is not None else None
    first = rows[0] if rows else None
    earlier = session.scalar(
        select(Hl7Result.id)
        .join(Job, Job.id == Hl7Result.job_id)
        .where(
            Job.study_id == study.id,
            Hl7Result.job_id != job_id,
            Hl7Result.destination == destination,
            Hl7Result.state == DeliveryState.SENT,
        )
        .limit(1)
    )
    return Report(
        job_id=job_id,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        modalities=study.modalities,
        model_name=first.model_name if first else job.model_name,
        model_version=first.model_version if first else job.model_version,
        model_demo=first.model_demo if first else False,
        finished_at=job.finished_at or job.updated_at,
        findings=tuple(StoredFinding(r.label, r.probability, r.threshold, r.positive) for r in rows),
        placer_order=order.placer_order if order else "",
        filler_order=order.filler_order if order else "",
        procedure_code=order.procedure_code if order else "",
        procedure_text=order.procedure_text if order else "",
        corrected=earlier is not None,
    )


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") or "0"


def to_oru(report: Report, settings: Settings, dest: Hl7Destination, control: str) -> str:
    """The ORU^R01 of a report for one destination (segments ended by CR)."""
    h = settings.hl7
    when = timestamp(report.finished_at)
    if report.procedure_code:
        service = f"{escape(report.procedure_code)}^{escape(report.procedure_text)}^L"
    else:
        service = f"DXNODE-AI^AI analysis^{LABEL_SYSTEM}"
    placer, filler = escape(report.placer_order), escape(report.filler_order or report.accession_number)
    modality = escape(report.modalities.split("\\")[0])
    obr = ["OBR", "1", placer, filler, service, "", "", when] + [""] * 10 + [escape(report.accession_number)]
    obr += ["", "", "", when, "", modality, report.status]  # OBR-22 report time, OBR-24 modality, OBR-25
    segments = [
        msh(
            h.sending_application,
            h.sending_facility,
            escape(dest.receiving_application),
            escape(dest.receiving_facility),
            "ORU^R01^ORU_R01",
            control,
            "2.5.1",
        ),
        f"PID|1||{escape(report.patient_id)}||{escape(report.patient_name)}",
        f"ORC|RE|{placer}|{filler}",
        "|".join(obr),
        f"NTE|1|L|{escape(report.disclaimer)}",
    ]
    equipment = escape(f"{report.model_name} {report.model_version}")
    for n, f in enumerate(report.findings, start=1):
        label = escape(f.label)
        segments.append(
            f"OBX|{n}|NM|{label}^{label}^{LABEL_SYSTEM}|{n}|{_number(f.probability)}|1^^UCUM|<{_number(f.threshold)}"
            f"|{'A' if f.positive else 'N'}|||{report.status}|||{when}|||{AI_FLAG}|{equipment}"
        )
    n = len(report.findings) + 1
    segments.append(f"OBX|{n}|ST|{STUDY_UID_CODE}||{escape(report.study_instance_uid)}||||||{report.status}")
    return "\r".join(segments) + "\r"

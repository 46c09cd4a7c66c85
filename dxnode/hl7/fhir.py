"""A result as FHIR: a transaction Bundle of one DiagnosticReport and an Observation per finding, validated
against the ``fhir.resources`` R4B models before it is sent (R4 servers read these resources unchanged).

Every resource carries the AI-generated flag as meta.security ``AIAST`` (HL7 v3 ObservationValue,
"Artificial Intelligence asserted"). An Observation: code = the label (system ``urn:dxnode:finding``),
valueQuantity = the probability (UCUM "1"), interpretation POS or NEG, referenceRange.high = the
threshold, device = the model. The DiagnosticReport names the accession number (identifier type ACSN),
the order's procedure when there is one, and the Observations; its conclusion is the disclaimer.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from dxnode.hl7.content import Report

AI_FLAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
LABEL_SYSTEM = "urn:dxnode:finding"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
_UCUM = "http://unitsofmeasure.org"


class InvalidFhir(ValueError):
    """The Bundle does not validate against the fhir.resources models (never sent: a bug to report)."""


def _instant(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _subject(report: Report) -> dict[str, Any] | None:
    """A logical reference to the patient by identifier (the node knows no Patient resource)."""
    return (
        {"identifier": {"value": report.patient_id}, "display": report.patient_name or None}
        if report.patient_id
        else None
    )


def _observation(report: Report, label: str, probability: float, threshold: float, positive: bool) -> dict[str, Any]:
    when = _instant(report.finished_at)
    return {
        "resourceType": "Observation",
        "meta": {"security": [AI_FLAG]},
        "status": "corrected" if report.corrected else "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
        ],
        "code": {"coding": [{"system": LABEL_SYSTEM, "code": label, "display": label}], "text": label},
        "subject": _subject(report),
        "effectiveDateTime": when,
        "issued": when,
        "valueQuantity": {"value": round(probability, 6), "unit": "1", "system": _UCUM, "code": "1"},
        "interpretation": [
            {
                "coding": [{"system": _INTERPRETATION, "code": "POS" if positive else "NEG"}],
                "text": f"threshold {threshold:g}",
            }
        ],
        "referenceRange": [
            {
                "high": {"value": threshold, "unit": "1", "system": _UCUM, "code": "1"},
                "text": "positive at or above high",
            }
        ],
        "device": {"display": f"{report.model_name} {report.model_version}"},
        "method": {"text": "AI-generated"},
    }


def _report(report: Report, results: list[str]) -> dict[str, Any]:
    code: dict[str, Any] = {"text": report.procedure_text or "AI analysis"}
    if report.procedure_code:
        code["coding"] = [{"code": report.procedure_code, "display": report.procedure_text or None}]
    identifiers: list[dict[str, Any]] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{report.study_instance_uid}"}]
    if report.accession_number:
        acsn = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
        identifiers.append({"type": acsn, "value": report.accession_number})
    return {
        "resourceType": "DiagnosticReport",
        "meta": {"security": [AI_FLAG]},
        "identifier": identifiers,
        "status": "corrected" if report.corrected else "final",
        "category": [_CATEGORY],
        "code": code,
        "subject": _subject(report),
        "effectiveDateTime": _instant(report.finished_at),
        "issued": _instant(report.finished_at),
        "result": [{"reference": ref} for ref in results],
        "conclusion": report.disclaimer,
    }


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_bundle(report: Report) -> dict[str, Any]:
    """The transaction Bundle of a report as JSON data, validated (InvalidFhir when it does not validate)."""
    # start-up time: fhir.resources loads its models only when a FHIR result is sent
    from fhir.resources.R4B.bundle import Bundle

    entries, refs = [], []
    for f in report.findings:
        ref = f"urn:uuid:{uuid.uuid4()}"
        refs.append(ref)
        resource = _observation(report, f.label, f.probability, f.threshold, f.positive)
        entries.append({"fullUrl": ref, "resource": resource, "request": {"method": "POST", "url": "Observation"}})
    entries.append(
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": _report(report, refs),
            "request": {"method": "POST", "url": "DiagnosticReport"},
        }
    )
    data = _drop_none({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    try:
        Bundle.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidFhir(f"not valid FHIR R4B: {exc}".replace("\n", " ")[:1000]) from None
    return data

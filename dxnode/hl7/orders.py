"""HL7 orders in: ORM^O01 and OMI^O23 read into fetch orders, matched against [[hl7.rules]], recorded in
``hl7_order`` (one row per source and accession number) and handed to the fetch stage.

An order group is an ORC with the OBR, TQ1, IPC and ZDS segments after it. Its accession number is IPC-1
(OMI^O23), else OBR-18 (IHE's ORM^O01); its modality IPC-5, else OBR-24; its procedure OBR-4; its
priority TQ1-9, else ORC-7.6, else OBR-27.6 (S = stat; A, P, C, T = high; R = medium; PRN = low). A rule
matches when the procedure code or the modality is one of its lists; the rule's priority, when it sets
one, wins over the order's. ORC-1 NW, XO and SC record the order (a second one for the same source and
accession number changes nothing: nothing is fetched twice); CA, OC, DC and CR cancel it.

Handing over: ``order_received`` records the order and calls ``dxnode.sources.fetch.request_fetch``; when
that refuses it (e.g. the rule names a source that is not configured) the order stays ``pending``, with
the reason in ``detail``, and ``hand_pending`` (on the scheduler) tries again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import hl7
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from dxnode.config import Hl7Rule, Settings
from dxnode.hl7.v2 import Refusal
from dxnode.hl7.v2 import field as get
from dxnode.schemas import Identifiers
from dxnode.sources.fetch import request_fetch
from dxnode.states import OrderState, Priority
from dxnode.store import Hl7Order, Store, audit
from dxnode.uids import is_valid_uid

log = logging.getLogger("dxnode.hl7.orders")

ORDER_TYPES = {("ORM", "O01"), ("OMI", "O23")}
PRIORITIES = {
    "S": Priority.STAT,
    "A": Priority.HIGH,
    "P": Priority.HIGH,
    "C": Priority.HIGH,
    "T": Priority.HIGH,
    "R": Priority.MEDIUM,
    "PRN": Priority.LOW,
}
RECORD = {"NW", "XO", "SC"}
CANCEL = {"CA", "OC", "DC", "CR"}
MAX_ACCESSION = 16  # DICOM Accession Number is an SH


@dataclass
class OrderGroup:
    """One ORC group of an order message, as read."""

    index: int  # 1-based position of its ORC (or first OBR) among the message's groups
    control: str = ""  # ORC-1
    placer_order: str = ""
    filler_order: str = ""
    accession_number: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    modality: str = ""
    priority: Priority | None = None
    study_instance_uid: str = ""
    codes: list[str] = field(default_factory=list)  # every priority code seen, for the log


@dataclass(frozen=True)
class FetchOrder:
    """What an order asks of the fetch stage: a study by accession number from a source."""

    source: str
    accession_number: str
    priority: Priority
    wait_minutes: float
    cancel: bool = False  # the placer cancelled it
    rule: str = ""
    placer_order: str = ""
    filler_order: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    modality: str = ""
    patient_id: str = ""
    study_instance_uid: str = ""


def _priority(code: str) -> Priority | None:
    return PRIORITIES.get(code.upper()) if code else None


def _read_segment(group: OrderGroup, seg: hl7.Segment, name: str) -> None:
    """Fill a group from one of its segments (the first value found wins)."""
    if name == "ORC":
        group.control = get(seg, 1).upper()
        group.placer_order = group.placer_order or get(seg, 2)
        group.filler_order = group.filler_order or get(seg, 3)
        group.priority = group.priority or _priority(get(seg, 7, 6))
    elif name == "TQ1":
        group.priority = _priority(get(seg, 9)) or group.priority
    elif name == "OBR":
        group.placer_order = group.placer_order or get(seg, 2)
        group.filler_order = group.filler_order or get(seg, 3)
        group.procedure_code = group.procedure_code or get(seg, 4, 1)
        group.procedure_text = group.procedure_text or get(seg, 4, 2)
        group.accession_number = group.accession_number or get(seg, 18)
        group.modality = group.modality or get(seg, 24)
        group.priority = group.priority or _priority(get(seg, 27, 6))
    elif name == "IPC":
        group.accession_number = get(seg, 1) or group.accession_number
        group.study_instance_uid = group.study_instance_uid or get(seg, 3)
        group.modality = get(seg, 5) or group.modality
    elif name == "ZDS":
        group.study_instance_uid = group.study_instance_uid or get(seg, 1)


def read_groups(msg: hl7.Message) -> tuple[str, list[OrderGroup]]:
    """The patient id (PID-3.1) and the order groups of an order message."""
    patient, groups = "", list[OrderGroup]()
    for seg in msg:
        name = str(seg[0]).upper()
        if name == "PID" and not patient:
            patient = get(seg, 3)
        if name == "ORC" or (name in ("OBR", "TQ1", "IPC") and not groups):
            groups.append(OrderGroup(index=len(groups) + 1))
        if groups:
            _read_segment(groups[-1], seg, name)
    return patient, groups


def matching_rule(settings: Settings, group: OrderGroup) -> Hl7Rule | None:
    """The first [[hl7.rules]] entry whose procedure codes or modalities name the group's."""
    for rule in settings.hl7.rules:
        if group.procedure_code and group.procedure_code in rule.procedure_codes:
            return rule
        if group.modality and group.modality.upper() in (m.upper() for m in rule.modalities):
            return rule
    return None


def fetch_orders(msg: hl7.Message, settings: Settings) -> tuple[list[FetchOrder], list[str]]:
    """The fetch orders of an ORM^O01 or OMI^O23 (raise Refusal when one lacks what it needs), and the
    lines saying why the other groups ask for nothing."""
    patient, groups = read_groups(msg)
    if not groups:
        raise Refusal("AE", 100, "no order: the message has no ORC or OBR segment")
    orders, ignored = [], []
    for group in groups:
        rule = matching_rule(settings, group)
        what = f"order {group.index} (procedure {group.procedure_code or '-'}, modality {group.modality or '-'})"
        if rule is None:
            ignored.append(f"{what}: no [[hl7.rules]] entry matches: no action")
            continue
        if group.control and group.control not in RECORD | CANCEL:
            ignored.append(f"{what}: order control {group.control}: no action")
            continue
        accession = group.accession_number
        if not accession:
            raise Refusal("AE", 101, f"{what}: no accession number (IPC-1 or OBR-18)", f"OBR^{group.index}^18")
        if len(accession) > MAX_ACCESSION or "\\" in accession:
            raise Refusal("AE", 102, f"{what}: accession number {accession[:40]!r} is not a DICOM SH (16 characters)")
        uid = group.study_instance_uid
        priority = Priority.parse(rule.priority) if rule.priority else group.priority or Priority.MEDIUM
        orders.append(
            FetchOrder(
                source=rule.source,
                accession_number=accession,
                priority=priority,
                wait_minutes=rule.wait_minutes or settings.hl7.wait_minutes,
                cancel=group.control in CANCEL,
                rule=rule.name,
                placer_order=group.placer_order[:64],
                filler_order=group.filler_order[:64],
                procedure_code=group.procedure_code[:64],
                procedure_text=group.procedure_text[:128],
                modality=group.modality[:16],
                patient_id=patient[:64],
                study_instance_uid=uid if is_valid_uid(uid) else "",
            )
        )
    return orders, ignored


def order_received(store: Store, settings: Settings, order: FetchOrder, sender: str = "", control_id: str = "") -> str:
    """Record a fetch order (or its cancellation) and hand a new one to the fetch stage; return what was done.

    The one entry point of orders into the node: an order for a source and accession number already
    recorded (and not cancelled) changes nothing, so the same order sent twice fetches once."""
    acc = order.accession_number
    with store.session() as s:
        row = s.scalar(select(Hl7Order).where(Hl7Order.source == order.source, Hl7Order.accession_number == acc))
        if order.cancel:
            if row is None or row.state == OrderState.CANCELLED:
                return f"accession {acc}: no open order to cancel"
            row.state, row.detail, row.control_id = OrderState.CANCELLED, f"cancelled by {sender}", control_id
            audit(s, sender or "hl7", "hl7.order.cancelled", target=f"hl7_order:{row.id}", accession=acc)
            return f"accession {acc}: order {row.id} cancelled"
        if row is not None and row.state != OrderState.CANCELLED:
            return f"accession {acc}: already ordered (order {row.id}, {row.state}): nothing more to do"
        values = {
            "priority": order.priority,
            "wait_minutes": order.wait_minutes,
            "state": OrderState.PENDING,
            "rule": order.rule,
            "placer_order": order.placer_order,
            "filler_order": order.filler_order,
            "procedure_code": order.procedure_code,
            "procedure_text": order.procedure_text,
            "modality": order.modality,
            "patient_id": order.patient_id,
            "study_instance_uid": order.study_instance_uid,
            "sender": sender[:128],
            "control_id": control_id[:64],
            "detail": "",
        }
        if row is None:
            row = Hl7Order(source=order.source, accession_number=acc, **values)
            s.add(row)
        else:  # ordered again after a cancellation
            for key, value in values.items():
                setattr(row, key, value)
        s.flush()
        order_id = row.id
        audit(
            s,
            sender or "hl7",
            "hl7.order",
            target=f"hl7_order:{order_id}",
            accession=acc,
            source=order.source,
            priority=order.priority,
            rule=order.rule,
        )
    handed = hand_over(store, settings, order_id)
    return f"accession {acc}: order {order_id} to fetch from {order.source} ({order.priority})" + (
        "" if handed else ", pending"
    )


def hand_over(store: Store, settings: Settings, order_id: int) -> bool:
    """Ask the fetch stage for a pending order's study; True once it took the request (state requested)."""
    with store.session() as s:
        row = s.get(Hl7Order, order_id)
        if row is None or row.state != OrderState.PENDING:
            return False
        source, accession, priority, wait = row.source, row.accession_number, row.priority, row.wait_minutes
    try:
        reference = request_fetch(
            store,
            settings,
            source,
            Identifiers(accession_number=accession),
            priority,
            actor=f"hl7:{order_id}",
            wait_seconds=float(wait or 0) * 60,
        )
    except (ValueError, SQLAlchemyError) as exc:
        reason = f"the fetch stage refused it: {exc}".splitlines()[0][:500]
        log.warning("hl7 order %d (accession %s): %s; tried again later", order_id, accession, reason)
        with store.session() as s:
            if (row := s.get(Hl7Order, order_id)) is not None:
                row.detail = reason
        return False
    with store.session() as s:
        if (row := s.get(Hl7Order, order_id)) is not None and row.state == OrderState.PENDING:
            row.state, row.detail, row.request_id = OrderState.REQUESTED, f"fetch request {reference}", reference
    return True


def record_ack(store: Store, sender: str, control_id: str, code: str) -> None:
    """Keep the ACK code answered to a message on the orders it recorded or cancelled (the Orders page shows it)."""
    if not control_id:
        return
    try:
        with store.session() as s:
            s.execute(
                update(Hl7Order)
                .where(Hl7Order.sender == sender[:128], Hl7Order.control_id == control_id[:64])
                .values(ack_code=code[:2])
                .execution_options(synchronize_session=False)
            )
    except SQLAlchemyError as exc:  # the ACK still goes out; only the page misses it
        log.warning("hl7: could not record the ACK of %s: %s", control_id, exc)


def hand_pending(store: Store, settings: Settings) -> int:
    """Hand every pending order to the fetch stage (a scheduler job); the number it took."""
    with store.session() as s:
        ids = s.scalars(
            select(Hl7Order.id).where(Hl7Order.state == OrderState.PENDING).order_by(Hl7Order.id).limit(100)
        ).all()
    return sum(hand_over(store, settings, order_id) for order_id in ids)

"""A Key Object Selection naming the images with positive findings ("Of Interest", by the AI)."""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dxnode.config import Settings
from dxnode.outputs.result_uids import derived_uid, result_key
from dxnode.results import StudyResult

KOS_SERIES_NUMBER = 9906
KOS_SERIES_DESCRIPTION = "AI Key Images"


def build_kos(result: StudyResult, sources: dict[str, Dataset], settings: Settings) -> list[Dataset]:
    """The KOS of the images that drove a positive finding (none when no finding is positive)."""
    named = sorted({f.source_sop_instance_uid for f in result.positive if f.source_sop_instance_uid in sources})
    if not named:
        return []
    images = [sources[uid] for uid in named]
    m = result.model
    labels = ", ".join(f"{f.label} {f.probability:.2f}" for f in result.positive)
    description = f"AI-generated ({m.name} {m.version}), not reviewed by a physician: images with {labels}"
    key = result_key(result)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=images,
        content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=images,
            description=description[:1024],
        ),
        series_instance_uid=derived_uid(key, "kos-series"),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=derived_uid(key, "kos"),
        instance_number=1,
        manufacturer=settings.report.manufacturer,
        institution_name=settings.report.institution_name or None,
    )
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    return [kos]

"""What a model is for: the ``intended_use`` a bundle's manifest declares, and how a series meets it.

A manifest may declare ``"intended_use": {"modalities": [...], "body_parts": [...],
"sop_classes": [...], "photometric": [...], "min_rows": N, "min_columns": N}``; every key is
optional and an empty one restricts nothing. A bundle without ``intended_use`` (older bundles,
ImageNet) declares nothing: it takes any image. Routing (dxnode/worklist/routing.py) applies the
declaration wherever the admin's own filters ([pipeline], a [[models]] entry) are empty.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Words that name the same region in BodyPartExamined, which is free text in practice.
BODY_PART_SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "CXR", "TORAX", "TORACE"}),
    frozenset({"ABDOMEN", "ABD", "ABDOMINAL"}),
    frozenset({"BREAST", "MAMMA", "MAMMO", "MAMMOGRAPHY"}),
)
_KEYS = {"modalities", "body_parts", "sop_classes", "photometric", "min_rows", "min_columns"}


def _words(values: Iterable[str]) -> tuple[str, ...]:
    """Upper-cased, stripped, de-duplicated values in their order, empty ones dropped."""
    return tuple(dict.fromkeys(v.strip().upper() for v in values if v.strip()))


@dataclass(frozen=True)
class IntendedUse:
    """The images a model is meant for; empty fields restrict nothing."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    photometric: tuple[str, ...] = ()
    min_rows: int = 0
    min_columns: int = 0

    @classmethod
    def from_dict(cls, d: Any) -> IntendedUse:
        """Parse a manifest's ``intended_use``; ValueError with a one-line reason when malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"intended_use must be an object, not {type(d).__name__}")
        unknown = set(d) - _KEYS
        if unknown:
            raise ValueError(f"intended_use: unknown key(s) {sorted(unknown)} (known: {sorted(_KEYS)})")
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("modalities", "body_parts", "sop_classes", "photometric"):
            value = d.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"intended_use.{key} must be a list of strings")
            lists[key] = tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
        sizes: dict[str, int] = {}
        for key in ("min_rows", "min_columns"):
            value = d.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"intended_use.{key} must be a whole number >= 0, not {value!r}")
            sizes[key] = value
        return cls(
            modalities=_words(lists["modalities"]),
            body_parts=_words(lists["body_parts"]),
            sop_classes=lists["sop_classes"],
            photometric=_words(lists["photometric"]),
            **sizes,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the manifest's ``intended_use``)."""
        return {
            "modalities": list(self.modalities),
            "body_parts": list(self.body_parts),
            "sop_classes": list(self.sop_classes),
            "photometric": list(self.photometric),
            "min_rows": self.min_rows,
            "min_columns": self.min_columns,
        }

    def short(self) -> str:
        """The declaration in a few words, e.g. "CR/DX CHEST" (for skip reasons)."""
        parts = ["/".join(self.modalities) or "any modality"]
        if self.body_parts:
            parts.append("/".join(self.body_parts))
        return " ".join(parts)

    def describe(self) -> str:
        """Every restriction in words (for `dxnode model info`)."""
        out = [
            f"modalities {'/'.join(self.modalities) or 'any'}",
            f"body parts {'/'.join(self.body_parts) or 'any'}",
        ]
        if self.sop_classes:
            out.append(f"SOP classes {', '.join(self.sop_classes)}")
        if self.photometric:
            out.append(f"photometric {'/'.join(self.photometric)}")
        if self.min_rows or self.min_columns:
            out.append(f"at least {self.min_rows} rows x {self.min_columns} columns")
        return "; ".join(out)


NO_DECLARATION = "none declared: no restriction (any modality, body part, SOP class, photometric, size)"
DEMO_NAME = "dxnode-demo"
DEMO_USE = IntendedUse(modalities=("CR", "DX"), body_parts=("CHEST",))


def read_declaration(bundle: Path) -> tuple[str, IntendedUse | None]:
    """A bundle folder's model name and intended use, from its manifest.json alone (no torch, no weights).

    ValueError or OSError when the manifest cannot be read; loading the bundle then says why in full."""
    d = json.loads((Path(bundle) / "manifest.json").read_text())
    if not isinstance(d, dict):
        raise ValueError("manifest.json is not an object")
    use = d.get("intended_use")
    return str(d.get("name", Path(bundle).name)), None if use is None else IntendedUse.from_dict(use)


def _group(term: str) -> frozenset[str]:
    return next((g for g in BODY_PART_SYNONYMS if term in g), frozenset({term}))


def body_part_matches(declared: Sequence[str], value: str) -> bool:
    """Whether a BodyPartExamined value meets a declared body part list, forgivingly.

    BodyPartExamined is often empty or free text, so: no declared parts, or an empty value,
    match (the modality is then the gate). Otherwise the value is upper-cased and split into
    words (on anything not a letter or digit); it matches when a word, or the whole value with
    spaces removed, equals a declared part or a synonym of it (CHEST = THORAX, THORACIC, LUNG,
    LUNGS, CXR, TORAX, TORACE; ABDOMEN = ABD, ABDOMINAL; BREAST = MAMMA, MAMMO, MAMMOGRAPHY),
    or starts or ends with one of at least four letters (DICOM's compound terms such as
    CHESTABDOMEN, and "LUNGS"). So "Chest PA", "THORAX" and "chest_lat" meet CHEST; "ANKLE" does not.
    """
    if not declared or not value.strip():
        return True
    text = value.upper()
    words = {w for w in re.split(r"[^A-Z0-9]+", text) if w} | {re.sub(r"\s+", "", text)}
    terms = {t for d in declared for t in _group(d.strip().upper())}
    for w in words:
        for t in terms:
            if w == t or (len(t) >= 4 and (w.startswith(t) or w.endswith(t))):
                return True
    return False


def split_list(text: str) -> list[str]:
    """A comma-separated command-line list ("CR,DX"), upper-cased; "" is the empty list."""
    return [w.strip().upper() for w in text.split(",") if w.strip()]

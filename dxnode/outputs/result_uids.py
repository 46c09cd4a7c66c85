"""UIDs of the result objects, derived from the result itself: a re-run rebuilds the same UIDs."""

from __future__ import annotations

import hashlib

from dxnode.results import StudyResult


def result_key(result: StudyResult) -> str:
    """A digest of everything that makes a result what it is (drives the output UIDs)."""
    m = result.model
    parts = [result.study_instance_uid, m.name, m.version, m.sha256]
    if result.route:  # two [[models]] entries serving one bundle still write different objects
        parts.append(f"route={result.route}")
    parts += [
        f"{f.label}={f.probability:.6f}:{int(f.positive)}:{f.source_sop_instance_uid}:{f.source_frame}"
        for f in sorted(result.findings, key=lambda f: f.label)
    ]
    parts += sorted(o.sop_instance_uid for o in result.instances if o.state == "done")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def derived_uid(*parts: str) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form from the given strings.

    pydicom's generate_uid(prefix=None) ignores its entropy sources, so the 128-bit integer is
    taken from a sha256 of the parts here (at most 44 characters).
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"

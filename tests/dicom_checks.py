"""Validators for every DICOM object dxnode writes: dciodvfy, Pixelmed's SR validator, dsrdump."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import need_tool
from pydicom.sr.codedict import Collection

JAVA_LIMITS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]
PIXELMED = "/usr/share/java/pixelmed.jar"


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy (dicom3tools) prints for a file."""
    need_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def pixelmed_sr_check(path: Path) -> tuple[str, list[str]]:
    """(root template found, Error lines) from com.pixelmed.validate.DicomSRValidator."""
    need_tool("java")
    from conftest import need

    need(Path(PIXELMED).exists(), "libpixelmed-java")
    out = subprocess.run(
        ["java", *JAVA_LIMITS, "-cp", PIXELMED, "com.pixelmed.validate.DicomSRValidator", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    root = next(
        (
            line.split("Found Root Template", 1)[1].strip()
            for line in text.splitlines()
            if "Found Root Template" in line
        ),
        "",
    )
    return root, [line for line in text.splitlines() if line.startswith("Error") and not stale_context_group(line)]


# Pixelmed's bundled context groups are an older edition (CID 100 of 2019): an "Error ... Code (V,S,"M") not
# found in context group N" naming a code the current standard's CID N holds (pydicom's tables, e.g. LOINC
# 43468-8 "XR unspecified body region" in CID 100) is Pixelmed's stale table, not an error of the SR.
_NOT_IN_GROUP = re.compile(r'Code \(([^,]+),([^,]+),"[^"]*"\) not found in context group (\d+)$')


def stale_context_group(line: str) -> bool:
    """Whether a Pixelmed error line is only about a code that the current edition of its context group holds."""
    found = _NOT_IN_GROUP.search(line)
    if found is None:
        return False
    value, scheme, cid = found.groups()
    try:
        current = Collection(f"CID{cid}").concepts.values()
    except KeyError:  # a group pydicom does not know
        return False
    return any((c.value, c.scheme_designator) == (value, scheme) for c in current)


def dsrdump(path: Path) -> str:
    """dsrdump's rendering of an SR."""
    need_tool("dsrdump")
    out = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout

"""The bundled dxnode.toml and the pydantic models (config.py) state the same defaults.

The models are the one place for defaults; the shipped file documents them key by key. A value
that differs there is a choice of the bundled configuration, and only these are allowed.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dxnode.config import Settings

# The bundled configuration's own choices, beyond the defaults: the PACS stand-in of the README's
# trial (PACS@127.0.0.1:4242), and a lung window preset for chest CT.
CHOSEN = {("destinations",), ("pipeline", "windows")}


def shipped() -> dict[str, Any]:
    return tomllib.loads(resources.files("dxnode").joinpath("resources/dxnode.toml").read_text())


def plain(value: Any) -> Any:
    """A default as TOML holds it (paths as strings, models as tables)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def test_every_value_in_the_shipped_toml_is_the_models_default() -> None:
    defaults = Settings.model_construct()
    differ = []
    for section, values in shipped().items():
        if (section,) in CHOSEN:
            continue
        model = getattr(defaults, section)
        assert isinstance(values, dict) and isinstance(model, BaseModel), section
        for key, value in values.items():
            if (section, key) in CHOSEN:
                continue
            assert key in type(model).model_fields, f"[{section}] {key} is not a setting"
            if plain(getattr(model, key)) != value:
                differ.append(f"[{section}] {key} = {value!r} in the toml, {plain(getattr(model, key))!r} in config.py")
    assert not differ, "\n".join(differ)


def test_the_shipped_toml_names_every_setting() -> None:
    doc = shipped()
    text = resources.files("dxnode").joinpath("resources/dxnode.toml").read_text()
    defaults = Settings.model_construct()
    missing = []
    for section in Settings.model_fields:
        model = getattr(defaults, section)
        if not isinstance(model, BaseModel):
            continue
        for key in type(model).model_fields:
            # Set in the file, or shown there as a commented example (TLS files, [[web.tokens]]).
            example = re.search(rf"^#\s*({re.escape(key)}\s*=|\[\[{section}\.{key}\]\])", text, re.M)
            if key not in doc.get(section, {}) and example is None:
                missing.append(f"[{section}] {key}")
    assert not missing, missing


def test_the_chosen_values_differ_only_where_said() -> None:
    doc = shipped()
    assert [d["name"] for d in doc["destinations"]] == ["pacs"] and Settings.model_construct().destinations == []
    assert doc["pipeline"]["windows"] and not Settings.model_construct().pipeline.windows

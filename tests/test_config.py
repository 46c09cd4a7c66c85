"""Configuration: the bundled file is valid, errors name the key, environment overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from dxnode.cli import main
from dxnode.config import ConfigError, default_config_path, load_settings


def test_bundled_config_is_valid_and_keeps_the_documented_names() -> None:
    s = load_settings(default_config_path())
    assert (s.node.ae_title, s.node.port, s.node.max_associations) == ("DXNODE", 11112, 10)
    assert s.database.url == "sqlite:///var/dxnode.db"
    assert s.worklist.stable_seconds == 10
    assert s.destinations[0].name == "pacs" and s.destinations[0].port == 4242
    assert s.web.host == "127.0.0.1" and s.web.tokens == []


def test_environment_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DXNODE_NODE__PORT", "2104")
    monkeypatch.setenv("DXNODE_NODE__ALLOWED_CALLING_AETS", '["CT1", "PACS"]')
    monkeypatch.setenv("DXNODE_WORKLIST__STABLE_SECONDS", "3.5")
    s = load_settings()
    assert s.node.port == 2104 and s.node.allowed_calling_aets == ["CT1", "PACS"]
    assert s.worklist.stable_seconds == 3.5
    assert s.node.ae_title == "DXNODE"  # the rest of the section still comes from the file


def test_dxnode_config_variable_chooses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('[node]\nae_title = "OTHER"\n')
    monkeypatch.setenv("DXNODE_CONFIG", str(cfg))
    assert load_settings().node.ae_title == "OTHER"


@pytest.mark.parametrize(
    "text, key",
    [
        ('[node]\nport = "eleven"\n', "node.port"),
        ("[node]\nprot = 11112\n", "node.prot"),
        ("[nodes]\nport = 1\n", "nodes"),
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 0\n', "destinations.0.port"),
        ('[report]\nheatmap_for = "some"\n', "report.heatmap_for"),
        ("[report]\nsc_max_side = 256\n", "report.sc_max_side"),  # 0 or >= 512: the caption needs the width
        ("[report]\nsc_max_side = -1\n", "report.sc_max_side"),
    ],
)
def test_bad_key_or_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_unknown_environment_section_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DXNODE_NDOE__PORT", "1")
    with pytest.raises(ConfigError, match="DXNODE_NDOE__PORT"):
        load_settings()


def test_cli_reports_config_errors_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nport = -1\n")
    assert main(["--config", str(cfg), "studies"]) == 2
    assert "node.port" in capsys.readouterr().err

"""Configuration: the bundled file is valid, errors name the key, environment overrides win."""

from __future__ import annotations

import re
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
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 0\n', "destinations[0].port"),
        ('[report]\nheatmap_for = "some"\n', "report.heatmap_for"),
        ("[report]\nsc_max_side = 256\n", "report.sc_max_side"),  # 0 or >= 512: the caption needs the width
        ("[report]\nsc_max_side = -1\n", "report.sc_max_side"),
    ],
)
def test_bad_key_or_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key)):
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


@pytest.mark.parametrize(
    "text, message",
    [
        ("[node]\nprot = 11112\n", "node.prot: unknown key (did you mean port?)"),
        ('[web]\nhots = "0.0.0.0"\n', "web.hots: unknown key (did you mean host?)"),
        ("[nod]\nport = 1\n", "unknown section or key 'nod' (did you mean node?)"),
        ('[[destinations]]\nname = "p"\nae_titel = "P"\nhost = "h"\nport = 104\n', "did you mean ae_title?"),
    ],
)
def test_unknown_key_in_the_file_suggests_the_closest(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert str(err.value).startswith(f"{cfg}: ") and message in str(err.value)


@pytest.mark.parametrize(
    "name, value, message",
    [
        (
            "DXNODE_NODE__PROT",
            "1",
            "environment variable DXNODE_NODE__PROT: unknown key 'prot' in [node] (did you mean port?)",
        ),
        (
            "DXNODE_NDOE__PORT",
            "1",
            "environment variable DXNODE_NDOE__PORT: unknown section 'ndoe' (did you mean node?)",
        ),
        ("DXNODE_NODE__PORT", "eleven", "environment variable DXNODE_NODE__PORT: node.port: "),
        (
            "DXNODE_NODE__ALLOWED_CALLING_AETS",
            "CT1",
            "environment variable DXNODE_NODE__ALLOWED_CALLING_AETS: not valid JSON",
        ),
    ],
)
def test_environment_errors_name_the_variable_not_the_file(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings(default_config_path())
    assert str(err.value).startswith(message) and "dxnode.toml" not in str(err.value)


@pytest.mark.parametrize(
    "token, message",
    [
        ("a", "web.tokens[0].token: has 1 character; a token needs at least 20"),
        ("short-but-not-20", "web.tokens[0].token: has 16 characters; a token needs at least 20"),
        ("********", "web.tokens[0].token: is the mask `dxnode config show` prints; put the real token"),
    ],
)
def test_short_tokens_and_the_mask_are_refused(tmp_path: Path, token: str, message: str) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[web.tokens]]\nname = "ops"\ntoken = "{token}"\nrole = "admin"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert message in str(err.value)
    assert f"'{token}'" not in str(err.value)  # a secret is never echoed back
    cfg.write_text('[[web.tokens]]\nname = "ops"\ntoken = "a-real-token-of-24-chars"\n')
    assert load_settings(cfg).web.tokens[0].token == "a-real-token-of-24-chars"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[web]\nsession_secret = "********"\n', "web.session_secret: is the mask `dxnode config show` prints"),
        (
            '[database]\nurl = "postgresql+psycopg://dxnode:***@db.example/dxnode"\n',
            "database.url: has the password mask `dxnode config show` prints (***)",
        ),
        ('[database]\nurl = "not a url"\n', "database.url: not a database URL"),
    ],
)
def test_other_masked_secrets_are_refused(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(cfg)


def test_config_check_cli_names_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DXNODE_NODE__PROT", "1")
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DXNODE_NODE__PROT" in err and "did you mean port?" in err


def test_pipeline_decode_threads_is_read_as_j2k_threads_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[pipeline] decode_threads was renamed j2k_threads ([model] decode_threads is another setting)."""
    from dxnode.config import DeprecatedKeyWarning

    cfg = tmp_path / "old.toml"
    cfg.write_text("[pipeline]\ndecode_threads = 3\n[model]\ndecode_threads = 5\n")
    with pytest.warns(
        DeprecatedKeyWarning, match=r"\[pipeline\] decode_threads is deprecated: rename it to j2k_threads"
    ):
        s = load_settings(cfg)
    assert (s.pipeline.j2k_threads, s.model.decode_threads) == (3, 5)
    cfg.write_text("[pipeline]\ndecode_threads = 3\nj2k_threads = 2\n")
    with pytest.raises(ConfigError, match="decode_threads is the old name of j2k_threads: set j2k_threads only"):
        load_settings(cfg)
    monkeypatch.setenv("DXNODE_PIPELINE__DECODE_THREADS", "3")
    with pytest.raises(
        ConfigError, match=r"DXNODE_PIPELINE__DECODE_THREADS: .* was renamed: set DXNODE_PIPELINE__J2K_THREADS"
    ):
        load_settings()

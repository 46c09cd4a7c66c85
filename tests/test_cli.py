"""The CLI as an admin meets it: one-line errors with a non-zero exit, defaults in --help, config show/check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dxnode.cli import build_parser, main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n')
    return cfg


@pytest.mark.parametrize("command", ["requeue", "complete"])
def test_unknown_study_is_one_line_and_exit_1(config: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config), command, "1.2.3.4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dxnode {command}: no study with Study Instance UID '1.2.3.4'"


def test_errors_never_print_a_traceback(config: Path) -> None:
    """A real process: what an admin's terminal shows."""
    out = subprocess.run(
        [sys.executable, "-m", "dxnode.cli", "--config", str(config), "requeue", "9.9.9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv, expected in [
        (["echo", "--help"], ["(default: ANY-SCP)", "(default: 10)"]),
        (["studies", "--help"], ["(default: 100)"]),
        (["results", "--help"], ["(default: 1000)"]),
        (["predict", "--help"], ["(default: 3)"]),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        text = " ".join(capsys.readouterr().out.split())
        for word in expected:
            assert word in text, (argv, word, text)
        assert "(default: None)" not in text and "(default: False)" not in text


def test_config_show_masks_secrets(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DXNODE_WEB__TOKENS", '[{"name":"ops","token":"very-secret-token","role":"admin"}]')
    monkeypatch.setenv("DXNODE_WEB__SESSION_SECRET", "another-secret")
    monkeypatch.setenv("DXNODE_DATABASE__URL", "postgresql+psycopg://dxnode:pg-password@db.example/dxnode")
    assert main(["--config", str(config), "config", "show"]) == 0
    text = capsys.readouterr().out
    for secret in ("very-secret-token", "another-secret", "pg-password"):
        assert secret not in text
    assert 'name = "ops"' in text and "db.example" in text
    assert main(["--config", str(config), "config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["web"]["tokens"][0]["token"] == "********" and data["node"]["data_dir"].endswith("var")


def test_config_show_output_is_a_valid_config(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config), "config", "show"]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    assert main(["config", "check", str(shown)]) == 0


def test_config_check_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[node]\nport = 104\n")
    assert main(["config", "check", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok"
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 70000\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.port" in err and "70000" in err and len(err.strip().splitlines()) == 1
    # a broken --config does not stop checking another file
    assert main(["--config", str(bad), "config", "check", str(good)]) == 0

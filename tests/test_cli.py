"""The CLI as an admin meets it: one-line errors with the README's exit codes, defaults in --help,
read commands that never create a database, config show/check.

Exit codes: 0 ok, 1 failure, 2 usage or configuration error, 141 when stdout's reader went away.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from pydicom.data import get_testdata_file

from dxnode.cli import build_parser, main

DXNODE = str(Path(sys.executable).with_name("dxnode"))


def dxnode(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A real `dxnode` process, as an admin's terminal runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DXNODE_")}
    return subprocess.run(
        [DXNODE, *args], capture_output=True, text=True, timeout=180, cwd=cwd, env={**full_env, **(env or {})}
    )


def one_line(text: str) -> str:
    """The only line of text (fails if there are more or none)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n')
    return cfg


@pytest.fixture
def database(config: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """The config's database, made by `dxnode db upgrade`."""
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    capsys.readouterr()
    return config


@pytest.mark.parametrize("command", ["requeue", "complete"])
def test_unknown_study_is_one_line_and_exit_1(database: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = database
    assert main(["--config", str(config), command, "1.2.3.4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dxnode {command}: no study with Study Instance UID '1.2.3.4'"


def test_errors_never_print_a_traceback(database: Path) -> None:
    config = database
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
    monkeypatch.setenv("DXNODE_WEB__TOKENS", '[{"name":"ops","token":"very-secret-token-0123456789","role":"admin"}]')
    monkeypatch.setenv("DXNODE_WEB__SESSION_SECRET", "another-secret")
    monkeypatch.setenv("DXNODE_DATABASE__URL", "postgresql+psycopg://dxnode:pg-password@db.example/dxnode")
    assert main(["--config", str(config), "config", "show"]) == 0
    text = capsys.readouterr().out
    for secret in ("very-secret-token-0123456789", "another-secret", "pg-password"):
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


def test_config_show_output_with_secrets_is_refused_until_they_are_put_back(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/operations.md suggests `config show > dxnode.toml`: the masks must not load as if they were the secrets."""
    monkeypatch.setenv("DXNODE_WEB__TOKENS", '[{"name":"ops","token":"very-secret-token-0123456789","role":"admin"}]')
    assert main(["--config", str(config), "config", "show"]) == 0
    text = capsys.readouterr().out
    assert "********" in text and "put back" in text
    monkeypatch.delenv("DXNODE_WEB__TOKENS")
    shown = tmp_path / "shown.toml"
    shown.write_text(text)
    assert main(["config", "check", str(shown)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "web.tokens[0].token" in err and "is the mask `dxnode config show` prints; put the real token" in err
    shown.write_text(text.replace("********", "very-secret-token-0123456789"))
    assert main(["config", "check", str(shown)]) == 0


# --- the new-user errors, each one line with the right words and exit code ------------------


def test_echo_port_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["echo", "127.0.0.1", "99999"])
    assert exit_.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("dxnode echo: argument port: 99999 is not a port number (1-65535)"), err


def test_echo_refused_connection_is_one_line_without_pynetdicom_errors(config: Path) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    out = dxnode("--config", str(config), "echo", "127.0.0.1", str(port))
    assert out.returncode == 1
    assert one_line(out.stderr) == f"dxnode echo: connection refused by 127.0.0.1:{port}"
    assert out.stdout == ""


def test_read_command_refuses_a_missing_database_and_creates_nothing(tmp_path: Path) -> None:
    """Run from an empty folder with the bundled config: no var/dxnode.db appears, the path is named."""
    for argv in (["studies"], ["jobs"], ["outbox"], ["results"], ["requeue", "1.2.3"], ["db", "current"], ["web"]):
        out = dxnode(*argv, cwd=tmp_path)
        assert out.returncode == 1, (argv, out.stderr)
        err = one_line(out.stderr)
        assert err.startswith(f"dxnode {' '.join(argv[:2] if argv[0] == 'db' else argv[:1])}: "), err
        assert f"no database at {tmp_path / 'var' / 'dxnode.db'}" in err, err
        assert "run `dxnode db upgrade` or `dxnode serve` first" in err
        assert list(tmp_path.iterdir()) == [], argv
    made = dxnode("db", "upgrade", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "var" / "dxnode.db").is_file()
    listed = dxnode("studies", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.startswith("STUDY_INSTANCE_UID")


def test_unreachable_postgresql_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://dxnode:pg-password@127.0.0.1:{free_port()}/dxnode"
    out = dxnode("studies", cwd=tmp_path, env={"DXNODE_DATABASE__URL": url})
    assert out.returncode == 1
    err = one_line(out.stderr)
    assert err.startswith("dxnode studies: cannot open the database postgresql+psycopg://dxnode:***@127.0.0.1:"), err
    assert "pg-password" not in err


@pytest.mark.parametrize("argv", [["outbox"], ["studies"], ["config", "show"]])
def test_closed_pipe_ends_quietly(database: Path, argv: list[str]) -> None:
    """`dxnode outbox | head`: the reader goes away first; no Broken pipe message, exit 141 (128 + SIGPIPE)."""
    proc = subprocess.Popen(
        [DXNODE, "--config", str(database), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the process has imported anything, let alone printed
    err = proc.stderr.read()
    assert proc.wait(120) == 141 and err == "", err


def test_predict_missing_file_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """A missing bundle would be exit 2; exit 1 naming the file shows the files are looked at first."""
    out = dxnode("predict", str(tmp_path / "nothere.dcm"), "--model", str(tmp_path / "no-bundle"))
    assert out.returncode == 1
    assert one_line(out.stderr) == f"dxnode predict: {tmp_path / 'nothere.dcm'}: no such file or folder"


def test_predict_non_dicom_file_says_so_without_pydicom_advice(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out = dxnode("predict", str(notes), "--model", "demo")
    assert out.returncode == 1
    err = one_line(out.stderr)
    assert err == f"dxnode predict: {notes}: not a DICOM file (no DICM prefix at byte 128), PNG or JPEG"
    assert "force" not in err


def test_predict_folder_analyses_its_dicom_files(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    (folder / "series2").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "series2" / "IM0001")  # no suffix, as PACS exports
    (folder / "README.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0" * 200)
    out = dxnode("predict", str(folder), "--model", "demo", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["file"] for r in rows] == [str(folder / "ct.dcm"), str(folder / "series2" / "IM0001")]
    assert all(r["error"] is None and r["findings"] for r in rows)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = dxnode("predict", str(empty), "--model", "demo")
    assert out.returncode == 1
    assert one_line(out.stderr) == f"dxnode predict: {empty}: a folder with no DICOM, PNG or JPEG file"


def test_list_tables_show_fields_of_their_response_models() -> None:
    from dxnode.schemas import DeliveryOut, JobOut, ResultOut, StudyOut, TableRow

    for model in (StudyOut, JobOut, ResultOut, DeliveryOut):
        assert model.table_columns and set(model.table_columns) <= set(model.model_fields)
    with pytest.raises(TypeError, match="names no field"):

        class Broken(TableRow):
            table_columns = ("nope",)
            id: int


def test_train_options_hold_every_train_option() -> None:
    import dataclasses

    from dxnode.training.options import TrainOptions

    args = build_parser().parse_args(["train", "--data", "d.csv", "--out", "b", "--loss", "focal"])
    opts = TrainOptions.from_args(args)
    assert (opts.data, opts.out, opts.loss, opts.lr, opts.batch_size) == (Path("d.csv"), Path("b"), "focal", None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lr = 1.0  # type: ignore[misc]
    given = set(vars(args)) - {"command", "config", "log_level", "handler"}
    assert given == {f.name for f in dataclasses.fields(TrainOptions)}  # no option is dropped on the way

"""The migration chain: one head, files in chain order, and every earlier revision upgrades to head."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import itertools
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from dxnode.states import JobState
from dxnode.store import Job, Store, current_revision, upgrade


def _scripts() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(importlib.resources.files("dxnode.migrations")))
    return ScriptDirectory.from_config(cfg)


def _chain() -> list[str]:
    """Revision ids from the first to the head."""
    return [rev.revision for rev in reversed(list(_scripts().walk_revisions()))]


def test_one_head_and_a_linear_chain() -> None:
    scripts = _scripts()
    assert len(scripts.get_heads()) == 1, scripts.get_heads()
    chain = _chain()
    assert chain[0] == "0001" and chain[-1] == scripts.get_current_head()
    for earlier, later in itertools.pairwise(chain):
        assert scripts.get_revision(later).down_revision == earlier


def test_files_sort_in_chain_order_and_carry_their_revision_id() -> None:
    """mNN_<id>_<what>.py: NN is the position in the chain (README.md in dxnode/migrations)."""
    folder = Path(str(importlib.resources.files("dxnode.migrations"))) / "versions"
    names = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
    chain = _chain()
    assert len(names) == len(chain)
    for position, (name, revision) in enumerate(zip(names, chain, strict=True), start=1):
        assert re.fullmatch(rf"m{position:02d}_{revision}_\w+\.py", name), (name, revision)
        assert Path(_scripts().get_revision(revision).path).name == name


EARLIER = _chain()[:-1]


@pytest.mark.parametrize("revision", EARLIER)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_database_at_every_earlier_revision_upgrades_to_head(
    revision: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A study and a finished job written at that revision are read back through the models at head."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url, revision)
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    store = Store(url)
    try:
        assert current_revision(store) == revision
        with store.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO study (id, study_instance_uid, patient_id, patient_name, accession_number,"
                    " study_date, study_description, modalities, calling_aet, first_received_at, last_received_at,"
                    " num_instances, ignored) VALUES (1, '1.2.3', '', '', '', '', '', 'CR', 'SCU', :t, :t, 1, :f)"
                ),
                {"t": now, "f": False},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO job (id, study_id, state, attempts, error, log, worker, model_name,"
                    " model_version, created_at, updated_at) VALUES (1, 1, 'done', 1, '', '', 'w', 'm', '1', :t, :t)"
                ),
                {"t": now},
            )
        store.dispose()
        upgrade(url)
        assert current_revision(store) == _chain()[-1]
        with store.session() as session:
            job = session.get(Job, 1)
            assert job is not None
            assert job.state == JobState.DONE
            assert job.routed_model == ""
    finally:
        store.dispose()

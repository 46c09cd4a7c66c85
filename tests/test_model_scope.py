"""What a model is for: a bundle's declared intended use, applied by routing where the admin set no filter.

Real C-STORE in (storescu), the real job body, real bundles on disk; the demo model declares CR/DX CHEST.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import data_store
import pytest
from nodeproc import DXNODE, InProcessNode, Node, node_config
from pydicom.data import get_testdata_file
from sqlalchemy import select
from test_routing import copy_as_new_study, jobs_by_study, run_all, storescu

from dxnode.config import Settings
from dxnode.inference.bundle import BundleError, demo_network, load_manifest, write_bundle
from dxnode.inference.intended import DEMO_USE, IntendedUse, body_part_matches
from dxnode.jobs.body import run_job
from dxnode.pipeline import Preprocessing
from dxnode.queries import study_detail
from dxnode.store import Output
from dxnode.worklist import queue
from dxnode.worklist.routing import beyond_declaration, declaration, entries

DATA = Path(data_store.__file__).parent / "data"
CR_CHEST, CR_EXTREMITY = DATA / "RG1_UNCR.dcm", DATA / "RG3_UNCR.dcm"  # real CRs, 1955 x 1841 and 1760 x 1760
US = DATA / "US1_UNCR.dcm"  # RGB ultrasound
DEMO_SKIP = "skipped: model dxnode-demo is for CR/DX CHEST"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessNode]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet file: the demo model
    n = InProcessNode(tmp_path)
    yield n
    n.stop()


def settings_of(node: InProcessNode, **sections: Any) -> Settings:
    """The node's store and data dir with the default filters (none), unless sections say otherwise."""
    return Settings(
        node={"data_dir": node.settings.node.data_dir},
        database={"url": node.store.url},
        worklist={"stable_seconds": 0},
        report={"heatmap_for": "top1"},
        **sections,
    )


def outputs_of(node: InProcessNode, study_uid: str) -> list[str]:
    with node.store.session() as s:
        return [o.kind for o in s.scalars(select(Output)) if o.file_path.startswith(f"outputs/{study_uid}/")]


def small_bundle(path: Path, use: IntendedUse | None) -> Path:
    """A bundle folder with the demo network's weights and the given declaration."""
    net, m = demo_network()
    write_bundle(
        path,
        net.state_dict(),
        name="scoped",
        version="1",
        labels=m.labels,
        task=m.task,
        thresholds=m.thresholds,
        preprocessing=Preprocessing(input_size=64),
        intended_use=use,
    )
    return path


def test_body_part_matching_is_forgiving_but_not_blind() -> None:
    chest = ["CHEST"]
    for value in ("CHEST", "chest", "Chest PA", "THORAX", "thorax_lat", "LUNG", "LUNGS", "CHESTABDOMEN", "", "  "):
        assert body_part_matches(chest, value), value
    for value in ("ANKLE", "EXTREMITY", "ABDOMEN", "HEAD", "KNEE", "BREAST"):
        assert not body_part_matches(chest, value), value
    assert body_part_matches([], "ANKLE")  # nothing declared: anything
    assert body_part_matches(["ABDOMEN"], "ABD") and body_part_matches(["BREAST"], "MAMMA")


def test_declaration_round_trips_through_the_manifest_and_bad_ones_are_refused(tmp_path: Path) -> None:
    use = IntendedUse(("CR", "DX"), ("CHEST",), ("1.2.840.10008.5.1.4.1.1.1",), ("MONOCHROME1",), 256, 200)
    bundle = small_bundle(tmp_path / "b", use)
    assert load_manifest(bundle).intended_use == use
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["intended_use"]["modalities"] == ["CR", "DX"] and raw["intended_use"]["min_columns"] == 200

    # An older bundle has no intended_use: no restriction.
    del raw["intended_use"]
    (bundle / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(bundle).intended_use is None
    for bad, message in (
        ({"modalities": "CR"}, "intended_use.modalities must be a list of strings"),
        ({"min_rows": -1}, "intended_use.min_rows must be a whole number >= 0"),
        ({"body_part": ["CHEST"]}, "unknown key"),
        (["CR"], "intended_use must be an object"),
    ):
        (bundle / "manifest.json").write_text(json.dumps({**raw, "intended_use": bad}))
        with pytest.raises(BundleError, match=message):
            load_manifest(bundle)

    assert demo_network()[1].intended_use == DEMO_USE == IntendedUse(("CR", "DX"), ("CHEST",))


def test_the_demo_model_analyses_chest_radiographs_only_and_says_why_it_skipped_the_rest(
    node: InProcessNode, tmp_path: Path
) -> None:
    chest, chest_files = copy_as_new_study(CR_CHEST, tmp_path / "chest")
    _, knee_files = copy_as_new_study(CR_EXTREMITY, tmp_path / "knee", StudyInstanceUID=chest, BodyPartExamined="KNEE")
    thorax, thorax_files = copy_as_new_study(CR_CHEST, tmp_path / "thorax", BodyPartExamined="THORAX PA")
    ankle, ankle_files = copy_as_new_study(CR_EXTREMITY, tmp_path / "ankle", BodyPartExamined="ANKLE")
    us, us_files = copy_as_new_study(US, tmp_path / "us")
    ct, ct_files = copy_as_new_study(Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct")
    storescu(node.port, chest_files + knee_files + thorax_files + ankle_files + us_files + ct_files)
    run_all(node, settings_of(node))  # the defaults: [pipeline] modalities = [], no [[models]]

    jobs = jobs_by_study(node)
    assert [j["state"] for j in jobs[chest]] == ["done"] and [j["state"] for j in jobs[thorax]] == ["done"]
    assert outputs_of(node, chest) and outputs_of(node, thorax)
    # The chest study's knee series is left out, and its job says so.
    assert jobs[chest][0]["routing"][0] == "model [model] for 1 of 2 series"
    assert jobs[chest][0]["routing"][1].endswith("body part KNEE: model dxnode-demo is for CR/DX CHEST")
    assert jobs[thorax][0]["routing"] == []
    for study, what in ((ankle, "body part ANKLE"), (us, "modality US"), (ct, "modality CT")):
        (job,) = jobs[study]
        assert job["state"] == "skipped" and job["model_name"] == "", job
        assert job["routing"][0] == DEMO_SKIP, job["routing"]
        assert job["reason"] == DEMO_SKIP  # the one line `dxnode jobs` shows in its REASON column
        assert any(what in line and line.endswith("model dxnode-demo is for CR/DX CHEST") for line in job["routing"])
        assert outputs_of(node, study) == []  # no SR, no SC into the PACS
    with node.store.session() as s:  # what the study page and /api/studies/{uid} show
        page = study_detail(s, ankle)
    assert page is not None and page.jobs[0].log.splitlines()[0] == f"routing: {DEMO_SKIP}"


def test_an_explicit_modality_list_is_used_as_written_and_warned_about(node: InProcessNode, tmp_path: Path) -> None:
    ct, ct_files = copy_as_new_study(Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct")
    mr, mr_files = copy_as_new_study(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr")
    storescu(node.port, ct_files + mr_files)
    settings = settings_of(node, pipeline={"modalities": ["CT"]})
    assert beyond_declaration(settings) == [
        "model [model] (dxnode-demo, for CR/DX CHEST): modalities ['CT'] go beyond the bundle's declared ['CR', 'DX']"
    ]
    assert beyond_declaration(settings_of(node, pipeline={"modalities": ["DX"]})) == []
    run_all(node, settings)
    jobs = jobs_by_study(node)
    assert [j["state"] for j in jobs[ct]] == ["done"] and outputs_of(node, ct)
    # MR is outside the admin's own list: refused per instance by [pipeline], as before.
    (mr_job,) = jobs[mr]
    assert mr_job["state"] == "skipped" and not outputs_of(node, mr)


def test_a_models_entry_takes_its_bundles_declaration_unless_it_names_its_own(
    node: InProcessNode, tmp_path: Path
) -> None:
    bundle = small_bundle(tmp_path / "scoped", IntendedUse(modalities=("MR",)))
    ct, ct_files = copy_as_new_study(Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct")
    mr, mr_files = copy_as_new_study(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr")
    storescu(node.port, ct_files + mr_files)
    models = [
        {"name": "declared", "bundle": str(bundle), "engine": "torch"},
        {"name": "chest", "bundle": "demo", "engine": "torch"},
    ]
    settings = settings_of(node, models=models)
    assert [declaration(settings, e)[0] for e in entries(settings)] == ["scoped", "dxnode-demo"]
    run_all(node, settings)
    jobs = jobs_by_study(node)
    assert [(j["routed_model"], j["state"]) for j in jobs[mr]] == [("declared", "done")]
    (ct_job,) = jobs[ct]
    assert ct_job["state"] == "skipped" and ct_job["routing"][0] == (
        "skipped: model scoped is for MR; model dxnode-demo is for CR/DX CHEST"
    )
    # An explicit rule refusing it too: the summary is the general one, each reason follows.
    models[1]["series_description"] = "^nothing$"
    with node.store.session() as s:
        queue.requeue_study(s, ct, actor="test")
    queue.drain(node.store, settings_of(node, models=models), run_job)
    newest = jobs_by_study(node)[ct][0]
    assert newest["routing"][0] == "no model matches this study"
    assert any("model scoped is for MR" in line for line in newest["routing"])


def test_declared_photometric_and_size_are_checked_per_instance_and_the_admin_may_lower_them(
    node: InProcessNode, tmp_path: Path
) -> None:
    use = IntendedUse(modalities=("CT",), photometric=("MONOCHROME2",), min_rows=256, min_columns=256)
    bundle = small_bundle(tmp_path / "big-ct", use)
    ct, ct_files = copy_as_new_study(Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct")  # 128 x 128
    storescu(node.port, ct_files)
    run_all(node, settings_of(node, model={"bundle": str(bundle), "engine": "torch"}))
    (job,) = jobs_by_study(node)[ct]
    assert job["state"] == "skipped"
    with node.store.session() as s:
        page = study_detail(s, ct)
    assert page is not None
    assert "instance skipped: 128 x 128 pixels is below the model's minimum 256 x 256" in page.jobs[0].log

    lowered = settings_of(
        node, model={"bundle": str(bundle), "engine": "torch"}, pipeline={"min_rows": 64, "min_columns": 64}
    )
    assert any("min_rows/min_columns 64 x 64 are below" in line for line in beyond_declaration(lowered))
    with node.store.session() as s:
        queue.requeue_study(s, ct, actor="test")
    queue.drain(node.store, lowered, run_job)
    assert jobs_by_study(node)[ct][0]["state"] == "done"


def test_serve_warns_at_start_where_an_explicit_list_goes_beyond_the_declaration(tmp_path: Path) -> None:
    config = node_config(tmp_path, pipeline={"modalities": ["CT"], "body_parts": ["ANKLE"]})
    node = Node(config)
    try:
        node.wait_for(r"modalities \['CT'\] go beyond the bundle's declared \['CR', 'DX'\]", timeout=10)
        node.wait_for(r"body parts \['ANKLE'\] go beyond the bundle's declared \['CHEST'\]", timeout=10)
    finally:
        node.stop()


def test_model_info_shows_the_declaration_or_that_there_is_none(tmp_path: Path) -> None:
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch-home"))  # no ImageNet file: the demo model
    demo = subprocess.run([DXNODE, "model", "info"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "intended_use: modalities CR/DX; body parts CHEST" in demo.stdout
    old = small_bundle(tmp_path / "old", None)
    shown = subprocess.run(
        [DXNODE, "model", "info", str(old), "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["intended_use"].startswith("none declared: no restriction")
    scoped = small_bundle(tmp_path / "scoped", IntendedUse(("MR",), ("HEAD",)))
    shown = subprocess.run(
        [DXNODE, "model", "info", str(scoped), "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert json.loads(shown.stdout)["intended_use"]["body_parts"] == ["HEAD"]


def test_train_declares_what_its_dicom_files_are_and_the_flags_override(tmp_path: Path) -> None:
    from test_train import make_dataset

    from dxnode.training.dataset import read_table
    from dxnode.training.train import intended_use_of

    data = make_dataset(tmp_path / "data", patients=12)  # synthetic CRs without a body part
    samples = read_table(data, None).samples
    use, said = intended_use_of(samples)
    assert use == IntendedUse(modalities=("CR",)) and "from the modalities and body parts of 24 DICOM" in said
    use, said = intended_use_of(samples, "cr, dx", "Chest")
    assert use == IntendedUse(("CR", "DX"), ("CHEST",)) and said.startswith("intended use: modalities CR/DX")
    assert intended_use_of(samples, "", "")[0] is None  # '' = any: nothing declared

    bundle = tmp_path / "bundle"
    args = ["train", "--data", str(data), "--out", str(bundle), "--epochs", "1", "--input-size", "32"]
    args += ["--val-fraction", "0.25", "--test-fraction", "0.25", "--intended-body-parts", "CHEST"]
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch-home"))
    out = subprocess.run([DXNODE, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "intended use: modalities CR; body parts CHEST" in out.stderr
    assert load_manifest(bundle).intended_use == IntendedUse(("CR",), ("CHEST",))


def test_routing_finds_the_declaration_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dxnode.config import ModelSettings
    from dxnode.inference.bundle import imagenet_weights_path
    from dxnode.worklist.routing import imagenet_file

    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        for ms in (ModelSettings(), ModelSettings(imagenet_weights="~/w.pth")):
            assert imagenet_file(ms) == imagenet_weights_path(ms)
    bundle = small_bundle(tmp_path / "scoped", IntendedUse(("MR",)))
    code = (
        "import sys; from dxnode.config import Settings; from dxnode.worklist.routing import beyond_declaration;"
        f"print(beyond_declaration(Settings(model={{'bundle': {str(bundle)!r}}}, pipeline={{'modalities': ['CT']}})));"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "model [model] (scoped, for MR): modalities ['CT'] go beyond" in out.stdout
    assert out.stdout.splitlines()[-1] == "False"  # the receiver process stays torch-free

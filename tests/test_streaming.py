"""Streaming analysis: same result as all-at-once, memory flat over a 1,000-slice study, SR O(findings)."""

from __future__ import annotations

import dataclasses
import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torchvision
from dicom_checks import dciodvfy_errors, pixelmed_sr_check
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_analysis import node_settings, receive  # noqa: F401 (a fixture)

from dxnode.analysis.streaming import analyze_study, driver_frame
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import write_bundle
from dxnode.jobs.body import run_job
from dxnode.metrics import STAGES
from dxnode.model import Classifier, load_classifier, overlay
from dxnode.outputs.report import write_outputs
from dxnode.pipeline import PipelineError, Preprocessing, read_dataset, read_frames, skip_reason, to_tensor
from dxnode.queries import JobFilter, list_jobs
from dxnode.results import Finding, StudyResult
from dxnode.store import Store
from dxnode.worklist import queue


@pytest.fixture(autouse=True)
def no_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the classifiers below use one thread (a loaded CI box: no OpenMP spinning)


def classifier(tmp_path: Path, batch_size: int, size: int = 64) -> Classifier:
    torch.manual_seed(11)
    net = torchvision.models.resnet18(num_classes=4)
    write_bundle(
        tmp_path / "bundle",
        net.state_dict(),
        name="stream-net",
        version="1",
        labels=["a", "b", "c", "d"],
        task="multilabel",
        thresholds=[0.5] * 4,
        preprocessing=Preprocessing(input_size=size),
    )
    return load_classifier(ModelSettings(bundle=str(tmp_path / "bundle"), batch_size=batch_size, threads=1))


def ct_slices(folder: Path, count: int, seed: int = 0) -> list[tuple[str, Path]]:
    """count CT slices of one series: CT_small's header (128x128), each with its own noise."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = template.pixel_array.astype(np.int16)
    rng = np.random.default_rng(seed)
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        ds = template.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + i]
        ds.PixelData = (base + rng.integers(-200, 200, base.shape, dtype=np.int16)).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((ds.SOPInstanceUID, path))
    return out


def all_at_once(
    instances: list[tuple[str, Path]], clf: Classifier, settings: Settings, heatmap_for: str
) -> StudyResult:
    """The pre-streaming analyze_study: every frame decoded and held, one pass, then aggregated."""
    prep, labels = clf.manifest.preprocessing, clf.manifest.labels
    outcomes, inputs = {}, []
    for uid, path in instances:
        try:
            ds = read_dataset(path)
            reason = skip_reason(ds, settings.pipeline)
            if reason:
                outcomes[uid] = ("skipped", reason, {})
                continue
            inputs += [(uid, f) for f in read_frames(ds, settings.pipeline, prep)]
        except PipelineError as exc:
            outcomes[uid] = ("failed", str(exc), {})
    probs, cams = clf.predict_with_cam(np.stack([to_tensor(f, prep) for _, f in inputs]))
    for uid in dict.fromkeys(u for u, _ in inputs):
        rows = [k for k, (u, _) in enumerate(inputs) if u == uid]
        outcomes[uid] = ("done", "", dict(zip(labels, probs[rows].max(axis=0).tolist(), strict=True)))
    study = probs.mean(axis=0) if settings.model.aggregate == "mean" else probs.max(axis=0)
    driver = probs.argmax(axis=0)
    positive = clf.positive(study)
    findings = [
        Finding(
            labels[j], float(study[j]), 0.5, bool(positive[j]), inputs[driver[j]][0], inputs[driver[j]][1].frame_index
        )
        for j in np.argsort(study)[::-1]
    ]
    chosen = findings if heatmap_for == "all" else findings[:1]
    heatmaps = []
    for f in chosen:
        j = labels.index(f.label)
        heatmaps.append((f.label, *overlay(inputs[driver[j]][1], cams[driver[j], j], prep)))
    return findings, [(uid, *outcomes[uid]) for uid, _ in instances if uid in outcomes], heatmaps  # type: ignore[return-value]


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_streaming_gives_the_all_at_once_result_on_a_mixed_study(tmp_path: Path, aggregate: str) -> None:
    instances = ct_slices(tmp_path / "ct", 5)
    instances.insert(2, ("1.2.826.0.1.3", Path(get_testdata_file("emri_small.dcm"))))  # 10 frames
    instances.insert(4, ("1.2.826.0.1.4", Path(get_testdata_file("reportsi.dcm"))))  # skipped
    instances.insert(5, ("1.2.826.0.1.5", Path(get_testdata_file("MR_truncated.dcm"))))  # cannot decode
    # batch 3 and max_frames 4: batches cut through the multi-frame instance and across instances
    settings = Settings(pipeline={"max_frames": 4}, model={"aggregate": aggregate, "batch_size": 3})
    clf = classifier(tmp_path, batch_size=3)
    findings, outcomes, heatmaps = all_at_once(instances, clf, settings, "all")

    streamed = analyze_study("1.2.3", instances, clf, settings, heatmap_for="all")

    assert [f.label for f in streamed.findings] == [f.label for f in findings]
    for s, f in zip(streamed.findings, findings, strict=True):
        assert abs(s.probability - f.probability) <= 1e-6
        assert (s.source_sop_instance_uid, s.source_frame, s.positive) == (
            f.source_sop_instance_uid,
            f.source_frame,
            f.positive,
        )
    assert [(o.sop_instance_uid, o.state, o.reason) for o in streamed.instances] == [o[:3] for o in outcomes]
    assert [o.state for o in streamed.instances] == ["done"] * 4 + ["skipped", "failed"] + ["done"] * 2
    for o, (_, _, _, probs) in zip(streamed.instances, outcomes, strict=True):
        assert o.probabilities.keys() == probs.keys()
        np.testing.assert_allclose(list(o.probabilities.values()), list(probs.values()), rtol=0, atol=1e-6)
    assert [h.label for h in streamed.heatmaps] == [label for label, _, _ in heatmaps]
    for h, (_, rgb, cam) in zip(streamed.heatmaps, heatmaps, strict=True):
        np.testing.assert_allclose(h.cam, cam, rtol=0, atol=1e-5)
        assert np.abs(h.overlay.astype(int) - rgb).max() <= 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples this process's resident set size every few milliseconds while in the block."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@pytest.fixture(scope="module")
def thousand_slices(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    return ct_slices(tmp_path_factory.mktemp("ct1000"), 1000, seed=1)


@pytest.mark.slow
def test_a_1000_slice_study_runs_in_bounded_memory_and_its_sr_is_small_fast_and_valid(
    tmp_path: Path, thousand_slices: list[tuple[str, Path]]
) -> None:
    settings = Settings(model={"batch_size": 8}, report={"heatmap_for": "top1"})
    clf = classifier(tmp_path, batch_size=8, size=32)
    analyze_study("1.2.3", thousand_slices[:16], clf, settings)  # warm up torch's allocator and thread pools
    timings: dict[str, float] = {}
    with PeakRSS() as rss:
        result = analyze_study("1.2.3", thousand_slices, clf, settings, heatmap_for="top1", timings=timings)
    # All at once held about 260 KB per slice here (source-size RGB float + display + input): 250+ MB.
    assert rss.growth_mb < 100, f"RSS grew {rss.growth_mb:.0f} MB over 1,000 slices"
    assert len(result.instances) == 1000 and {o.state for o in result.instances} == {"done"}
    assert timings["model"] > 0 and timings["decode"] > 0

    study_uid = str(pydicom.dcmread(thousand_slices[0][1], stop_before_pixels=True).StudyInstanceUID)
    result.study_instance_uid = study_uid
    # The SR costs O(findings): about what the same findings cost with only their own images analysed.
    drivers = {f.source_sop_instance_uid for f in result.findings}
    small = dataclasses.replace(result, instances=[o for o in result.instances if o.sop_instance_uid in drivers])
    small_sources = {u: p for u, p in thousand_slices if u in drivers}
    write_outputs(small, small_sources, settings, tmp_path / "warm-up", {})  # first SR of a process loads code
    spent: dict[str, float] = {}
    small_spent: dict[str, float] = {}
    # The timings compare the work of the two writes: a full garbage collection over everything this
    # test process holds (in a whole-suite run, hundreds of tests' objects) would land in one or the other.
    gc.collect()
    gc.disable()
    try:
        written = write_outputs(result, dict(thousand_slices), settings, tmp_path / "out", spent)
        write_outputs(small, small_sources, settings, tmp_path / "small", small_spent)
    finally:
        gc.enable()
    assert spent["sr"] < 2 * small_spent["sr"] + 0.25, (spent, small_spent)
    (sr_out,) = [w for w in written if w.kind == "sr"]
    sr = pydicom.dcmread(sr_out.path)
    listed = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    heatmap_scs = {w.sop_instance_uid for w in written if w.kind == "sc"}  # the SR references its heatmaps too
    assert listed == drivers | heatmap_scs and len(listed - heatmap_scs) <= len(result.findings)
    assert "PertinentOtherEvidenceSequence" not in sr
    assert sr_out.path.stat().st_size < 100_000
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
    root, errors = pixelmed_sr_check(sr_out.path)
    assert root.startswith("TID_1500") and errors == []


def test_a_driver_frame_read_again_is_the_frame_the_model_saw() -> None:
    settings, prep = Settings(pipeline={"max_frames": 4}), Preprocessing(input_size=64)
    for name in ("emri_small.dcm", "CT_small.dcm", "examples_ybr_color.dcm"):
        path = Path(get_testdata_file(name))
        for frame in read_frames(path, settings.pipeline, prep):
            again = driver_frame(path, frame.frame_index, settings, prep)
            assert again.frame_index == frame.frame_index
            np.testing.assert_array_equal(again.display, frame.display)
            np.testing.assert_array_equal(again.image, frame.image)


def test_a_job_records_its_stage_timings_calls_the_heartbeat_and_the_histogram_counts_them(
    store: Store,
    node_settings: Settings,  # noqa: F811 (the fixture imported above)
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from dxnode.web.app import metrics_text

    def samples(stage: str) -> float:
        text = metrics_text(store).decode()
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "dxnode_stage_seconds"]
        return next(s.value for s in family.samples if s.name.endswith("_count") and s.labels["stage"] == stage)

    receive(store, node_settings, ["CT_small.dcm", "CT_small.dcm", "reportsi.dcm"])
    assert queue.sweep(store, node_settings)
    job_id = queue.claim(store)
    beats: list[str] = []
    assert run_job(store, node_settings, job_id, heartbeat=beats.append) == "done"
    queue.finish(store, node_settings, job_id, "done")
    assert beats[0] == "load" and {"analyze", "decode", "model", "cam", "findings", "outputs"} <= set(beats)
    assert beats.count("model") >= 1  # once per batch
    with store.session() as s:
        (job,) = list_jobs(s, JobFilter())
    assert set(job.timings) == set(STAGES)
    assert all(seconds >= 0 for seconds in job.timings.values())
    assert job.timings["queued_to_done"] >= job.timings["model"]
    assert all(samples(stage) == 1 for stage in STAGES)

"""A study streamed through the classifier: instances decoded ahead in threads, batches folded into one
running result, heatmaps drawn on the frames that drove each finding."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dxnode.config import Settings
from dxnode.model import MAX_STORED_FINDINGS, Classifier, overlay
from dxnode.pipeline import Frame, PipelineError, Preprocessing, read_dataset, read_frames, skip_reason, to_tensor
from dxnode.results import Finding, Heatmap, InstanceOutcome, StudyResult
from dxnode.states import HeatmapFor

Key = tuple[str, int]  # (SOP Instance UID, frame index): one model input


class RunningStudy:
    """The aggregate so far of frames run in batches: per label the best (or summed) probability, the frame
    that drove it and its raw CAM. Studies fold batch after batch; a single file folds all its frames once."""

    def __init__(self, n_labels: int) -> None:
        self.best = np.full(n_labels, -np.inf, np.float32)
        self.total = np.zeros(n_labels, np.float64)
        self.frames = 0
        self.driver: list[Key] = [("", 0)] * n_labels
        self.cams: np.ndarray | None = None  # [L, h, w] raw CAM of each label's driver frame

    def fold(self, probs: np.ndarray, cams: np.ndarray, keys: list[Key]) -> None:
        """Fold one batch in; on ties the earlier frame stays the driver (like argmax over the study)."""
        self.total += probs.sum(axis=0, dtype=np.float64)
        self.frames += len(probs)
        rows = probs.argmax(axis=0)
        top = probs[rows, np.arange(probs.shape[1])]
        better = np.flatnonzero(top > self.best)
        if self.cams is None:
            self.cams = np.zeros((probs.shape[1], *cams.shape[2:]), np.float32)
        self.best[better] = top[better]
        self.cams[better] = cams[rows[better], better]
        for j in better:
            self.driver[j] = keys[rows[j]]

    def study(self, aggregate: str) -> np.ndarray:
        """Probability per label by [model] aggregate: max (or mean) over every frame folded in."""
        return (self.total / self.frames).astype(np.float32) if aggregate == "mean" else self.best


@dataclass
class _Decoded:
    """One instance after the pixel chain: its model inputs (frame index, tensor, display-only frame), or why it has none."""

    sop_instance_uid: str
    inputs: list[tuple[int, np.ndarray, Frame]]  # the Frame without its model image
    outcome: InstanceOutcome | None  # skipped or failed
    seconds: float  # read + decode + window + resize, in the decoding thread
    notes: str = ""  # what the pixel chain noted (e.g. a non-finite window it did not use)


@dataclass
class _Pending:
    """An instance with frames still to run: how many, its highest probabilities so far, the pipeline's notes."""

    frames_left: int
    notes: str
    best: np.ndarray | None = None


# Given an exception other than PipelineError raised on one instance's data: the reason it fails that instance
# alone (the same data raises it again), or None when it must fail the whole attempt (disk, memory: retried).
FailsAlone = Callable[[Exception], str | None]


def _decode_instance(
    uid: str, path: Path, settings: Settings, prep: Preprocessing, fails_alone: FailsAlone | None = None
) -> _Decoded:
    """Read one instance into model inputs; only the display image of each frame is kept beside them."""
    start = time.perf_counter()
    try:
        ds = read_dataset(path, settings.pipeline.max_decoded_mb)
        reason = skip_reason(ds, settings.pipeline)
        if reason:
            return _Decoded(uid, [], InstanceOutcome(uid, "skipped", reason), time.perf_counter() - start)
        frames = read_frames(ds, settings.pipeline, prep, display_max_side=settings.report.sc_max_side)
        inputs = [(f.frame_index, to_tensor(f, prep), f.without_image()) for f in frames]
    except PipelineError as exc:
        return _Decoded(uid, [], InstanceOutcome(uid, "failed", str(exc)), time.perf_counter() - start)
    except Exception as exc:  # not a refusal the pipeline made: a bug on this data, or the machine
        alone = fails_alone(exc) if fails_alone is not None else None
        if alone is None:
            raise
        return _Decoded(uid, [], InstanceOutcome(uid, "failed", alone), time.perf_counter() - start)
    notes = "; ".join(dict.fromkeys(n for f in frames for n in f.notes))
    return _Decoded(uid, inputs, None, time.perf_counter() - start, notes)


def _prefetched(
    pool: ThreadPoolExecutor,
    instances: list[tuple[str, Path]],
    settings: Settings,
    prep: Preprocessing,
    ahead: int,
    fails_alone: FailsAlone | None,
) -> Generator[Future[_Decoded], None, None]:
    """Decoding futures in study order, at most `ahead` submitted beyond the one being consumed."""
    pending: deque[Future[_Decoded]] = deque()
    try:
        for uid, path in instances:
            pending.append(pool.submit(_decode_instance, uid, path, settings, prep, fails_alone))
            if len(pending) > ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:  # closed early (an error mid-study): drop the decodes not started yet
        for future in pending:
            future.cancel()


def driver_frame(path: Path, frame_index: int, settings: Settings, prep: Preprocessing) -> Frame:
    """Re-read the one frame that drove a finding, for its heatmap."""
    (frame,) = read_frames(
        path, settings.pipeline, prep, frames=[frame_index], display_max_side=settings.report.sc_max_side
    )
    return frame


def heatmap_labels(findings: list[Finding], heatmap_for: HeatmapFor) -> list[Finding]:
    """The findings that get a heatmap by [report] heatmap_for: all, top1 or the positive ones."""
    if heatmap_for == HeatmapFor.ALL:
        return findings
    if heatmap_for == HeatmapFor.TOP1:
        return findings[:1]
    return [f for f in findings if f.positive]


@dataclass
class _StudyRun:
    """The state of one analyze_study call: the running result, the instances in flight, kept display images."""

    classifier: Classifier
    tick: Callable[[str], None]
    spent: dict[str, float]
    running: RunningStudy
    outcomes: dict[str, InstanceOutcome] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    waiting: list[tuple[str, int, np.ndarray, Frame]] = field(default_factory=list)  # decoded, not yet run
    kept: dict[Key, Frame] = field(default_factory=dict)  # display images of current drivers, at most batch_size

    def take(self, decoded: _Decoded) -> None:
        """Queue an instance's inputs and run every full batch."""
        if decoded.outcome is not None:
            self.outcomes[decoded.sop_instance_uid] = decoded.outcome
            return
        if decoded.inputs:
            self.pending[decoded.sop_instance_uid] = _Pending(len(decoded.inputs), decoded.notes)
        self.waiting += [(decoded.sop_instance_uid, i, x, shown) for i, x, shown in decoded.inputs]
        size = self.classifier.batch_size
        while len(self.waiting) >= size:
            self.run_batch(self.waiting[:size])
            del self.waiting[:size]

    def flush(self) -> None:
        """Run the last, partial batch."""
        if self.waiting:
            self.run_batch(self.waiting)
            self.waiting.clear()

    def run_batch(self, batch: list[tuple[str, int, np.ndarray, Frame]]) -> None:
        """One forward pass, folded into the study; instances whose last frame ran are done."""
        start = time.perf_counter()
        probs, cams = self.classifier.forward(np.stack([x for _, _, x, _ in batch]))
        self.spent["model"] += time.perf_counter() - start
        self.running.fold(probs, cams, [(uid, i) for uid, i, _, _ in batch])
        drivers = set(self.running.driver)
        self.kept.update({(uid, i): shown for uid, i, _, shown in batch if (uid, i) in drivers})
        for key in [k for k in self.kept if k not in drivers]:
            del self.kept[key]
        while len(self.kept) > self.classifier.batch_size:
            del self.kept[next(iter(self.kept))]  # the oldest; re-read at the end if it still drives a label
        for (uid, _, _, _), p in zip(batch, probs, strict=True):
            self._instance_frame(uid, p)
        self.tick("model")

    def _instance_frame(self, uid: str, probs: np.ndarray) -> None:
        state = self.pending[uid]
        state.frames_left -= 1
        state.best = probs if state.best is None else np.maximum(state.best, probs)
        if state.frames_left == 0:
            del self.pending[uid]
            labels = self.classifier.manifest.labels
            best = state.best
            top = np.argsort(best)[::-1][:MAX_STORED_FINDINGS] if len(labels) > 20 else range(len(labels))
            self.outcomes[uid] = InstanceOutcome(uid, "done", state.notes, {labels[j]: float(best[j]) for j in top})

    def heatmaps(
        self, findings: list[Finding], heatmap_for: HeatmapFor, paths: dict[str, Path], settings: Settings
    ) -> list[Heatmap]:
        """Overlays of the chosen findings on their driver frames (kept, or read again)."""
        prep = self.classifier.manifest.preprocessing
        labels = self.classifier.manifest.labels
        frames: dict[Key, Frame] = {}
        assert self.running.cams is not None
        heatmaps = []
        for f in heatmap_labels(findings, heatmap_for):
            j = labels.index(f.label)
            key = self.running.driver[j]
            if key in self.kept:
                frames[key] = self.kept.pop(key)
            elif key not in frames:
                frames[key] = driver_frame(paths[key[0]], key[1], settings, prep)
            rgb, cam = overlay(frames[key], self.running.cams[j], prep)
            heatmaps.append(Heatmap(f.label, key[0], key[1], rgb, cam))
        return heatmaps


def analyze_study(
    study_instance_uid: str,
    instances: list[tuple[str, Path]],
    classifier: Classifier,
    settings: Settings,
    heatmap_for: HeatmapFor = HeatmapFor.POSITIVE,
    progress: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
    pool: ThreadPoolExecutor | None = None,
    fails_alone: FailsAlone | None = None,
) -> StudyResult:
    """Run every eligible instance of a study; one bad instance fails alone with its reason.

    Streaming: a small thread pool decodes the next instances while the model runs a batch of
    batch_size inputs; each batch is folded into a running study result and dropped, so memory is
    bounded by the batch and the prefetch, not the study. Heatmaps are made afterwards on the
    driver frames: the display images of up to batch_size current drivers are kept (a small
    study needs no second read), the others are re-read. progress(stage) is called between batches and stages;
    timings gets decode, decode_wait, model and cam seconds added. pool: the process's decoding
    threads (ModelRegistry.decode_pool); without one, threads are started for this study. fails_alone: which
    other exceptions decoding one instance fails that instance alone (the job body's classification); without
    it, only a PipelineError does.
    """
    if pool is None:
        with ThreadPoolExecutor(settings.model.decode_threads, thread_name_prefix="dxnode-decode") as own:
            return analyze_study(
                study_instance_uid, instances, classifier, settings, heatmap_for, progress, timings, own, fails_alone
            )
    spent = timings if timings is not None else {}
    for stage in ("decode", "decode_wait", "model", "cam"):
        spent.setdefault(stage, 0.0)
    run = _StudyRun(classifier, progress or (lambda stage: None), spent, RunningStudy(len(classifier.manifest.labels)))
    run.tick("decode")
    ahead = classifier.batch_size + settings.model.decode_threads
    futures = _prefetched(pool, instances, settings, classifier.manifest.preprocessing, ahead, fails_alone)
    try:
        for future in futures:
            start = time.perf_counter()
            decoded = future.result()
            spent["decode_wait"] += time.perf_counter() - start
            spent["decode"] += decoded.seconds
            run.take(decoded)
    finally:
        futures.close()
    run.flush()
    findings: list[Finding] = []
    heatmaps: list[Heatmap] = []
    if run.running.frames:
        labels = classifier.manifest.labels
        limit = MAX_STORED_FINDINGS if len(labels) > 20 else None
        findings = classifier.findings(run.running.study(settings.model.aggregate), run.running.driver, limit)
        run.tick("cam")
        start = time.perf_counter()
        heatmaps = run.heatmaps(findings, heatmap_for, dict(instances), settings)
        spent["cam"] += time.perf_counter() - start
    ordered = [run.outcomes[uid] for uid, _ in instances if uid in run.outcomes]
    return StudyResult(study_instance_uid, classifier.identity, findings, ordered, heatmaps)

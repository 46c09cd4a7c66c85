"""ResNet-18 model bundles, batched inference, study-level aggregation and Grad-CAM overlays.

A bundle is a folder: ``weights.pt`` (a torchvision resnet18 state dict with fc sized to the
labels) and ``manifest.json`` (name, version, labels, task, thresholds, preprocessing, sha256 of
the weights, checked at load). Nothing is ever downloaded: with no bundle configured, dxnode
serves torchvision's ImageNet classifier if ``resnet18-f37072fd.pth`` is on disk, else an
untrained demo model that says so in every output.

Grad-CAM: ResNet-18 ends in global average pooling and one linear layer, so the gradient of a
class logit with respect to each layer4 channel is that class's fc weight divided by the map
size, the same at every position. Grad-CAM's channel weights are therefore the fc weights, and
the map is ``relu(sum_c w[l, c] * A_c)``, computed here in the forward pass, with no backward pass
(tests/test_model.py checks it against pytorch-grad-cam's backward-pass GradCAM).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from dxnode.config import ModelSettings, Settings
from dxnode.pipeline import (
    Frame,
    PipelineError,
    Preprocessing,
    geometry,
    map_to_source,
    read_dataset,
    read_frames,
    skip_reason,
    to_tensor,
)
from dxnode.results import Finding, Heatmap, InstanceOutcome, ModelIdentity, StudyResult

log = logging.getLogger("dxnode.model")

IMAGENET_FILE = "resnet18-f37072fd.pth"
IMAGENET_SHA256_PREFIX = "f37072fd"  # torchvision names its files by their sha256 prefix
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEMO_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule", "Pneumothorax"]
DEMO_SEED = 20261125
MAX_STORED_FINDINGS = 10  # multi-class models with many labels keep their top findings only


class BundleError(Exception):
    """A model bundle is missing, malformed or its weights do not match the manifest."""


@dataclass(frozen=True)
class Manifest:
    """What a bundle says about itself (manifest.json)."""

    name: str
    version: str
    labels: list[str]
    task: str  # "multilabel" (sigmoid per label) or "multiclass" (softmax)
    thresholds: list[float]
    preprocessing: Preprocessing
    weights_file: str = "weights.pt"
    weights_sha256: str = ""
    demo: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "task": self.task,
            "thresholds": self.thresholds,
            "preprocessing": self.preprocessing.to_dict(),
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "demo": self.demo,
            "description": self.description,
            "extra": self.extra,
        }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _validate(m: Manifest, where: str) -> None:
    if m.task not in ("multilabel", "multiclass"):
        raise BundleError(f"{where}: task must be multilabel or multiclass, not {m.task!r}")
    if not m.labels or len(m.thresholds) != len(m.labels):
        raise BundleError(
            f"{where}: needs labels and one threshold per label ({len(m.labels)} labels, {len(m.thresholds)} thresholds)"
        )


def write_bundle(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    name: str,
    version: str,
    labels: list[str],
    task: str,
    thresholds: list[float],
    preprocessing: Preprocessing,
    demo: bool = False,
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write weights.pt and manifest.json (with the weights' sha256) into the folder path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "weights.pt"
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, weights)
    manifest = Manifest(
        name,
        version,
        list(labels),
        task,
        [float(t) for t in thresholds],
        preprocessing,
        "weights.pt",
        sha256_file(weights),
        demo,
        description,
        dict(extra or {}),
    )
    _validate(manifest, str(path))
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2))
    tmp.replace(path / "manifest.json")
    return manifest


def load_manifest(path: Path) -> Manifest:
    """Read and validate a bundle's manifest.json."""
    file = Path(path) / "manifest.json"
    try:
        d = json.loads(file.read_text())
        m = Manifest(
            name=d["name"],
            version=str(d["version"]),
            labels=list(d["labels"]),
            task=d["task"],
            thresholds=[float(t) for t in d["thresholds"]],
            preprocessing=Preprocessing.from_dict(d.get("preprocessing", {})),
            weights_file=d.get("weights_file", "weights.pt"),
            weights_sha256=d.get("weights_sha256", ""),
            demo=bool(d.get("demo", False)),
            description=d.get("description", ""),
            extra=d.get("extra", {}),
        )
    except FileNotFoundError:
        raise BundleError(f"model bundle {path}: no manifest.json") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"model bundle {path}: manifest.json is invalid: {exc}") from None
    _validate(m, str(file))
    return m


def verify_weights(path: Path, manifest: Manifest) -> Path:
    """The weights file, after checking it exists and matches the manifest's sha256."""
    weights = Path(path) / manifest.weights_file
    if not weights.is_file():
        raise BundleError(f"model weights missing: {weights} (expected sha256 {manifest.weights_sha256})")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise BundleError(
            f"model weights {weights} do not match the manifest: sha256 {actual}, expected {manifest.weights_sha256}; refusing to load"
        )
    return weights


def resnet18(num_labels: int) -> torch.nn.Module:
    """torchvision ResNet-18 with fc sized to the labels (no weights downloaded)."""
    return torchvision.models.resnet18(weights=None, num_classes=num_labels)


def choose_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BundleError(f"[model] device = {name!r} but CUDA is not available")
    return torch.device(name)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Model outputs as probabilities: softmax over the labels for multiclass, a sigmoid per label otherwise."""
    return torch.softmax(logits, dim=1) if task == "multiclass" else torch.sigmoid(logits)


def positive_call(probs: np.ndarray, thresholds: Sequence[float], task: str) -> np.ndarray:
    """Which labels are positive, for one row [L] or rows [N, L]: at or above the label's threshold,
    and for multiclass only the top class of its row. (The node, evaluation and training all call this.)"""
    rows = np.atleast_2d(probs)
    pos = rows >= np.asarray(thresholds, dtype=np.float64)
    if task == "multiclass" and len(rows):
        top = np.zeros_like(pos)
        top[np.arange(len(rows)), rows.argmax(axis=1)] = True
        pos &= top
    return pos.reshape(np.shape(probs))


def aggregate(probs: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-label probabilities of a study (or file) from its frames' rows [N, L] by [model] aggregate
    ("max" or "mean"), and for each label the row that drove it (its highest)."""
    return (probs.mean(axis=0) if how == "mean" else probs.max(axis=0)), probs.argmax(axis=0)


class Classifier:
    """A loaded ResNet-18 with its manifest; thread-safe inference."""

    def __init__(self, net: torch.nn.Module, manifest: Manifest, device: torch.device, batch_size: int = 8) -> None:
        self.net = net.to(device).eval()
        self.manifest = manifest
        self.device = device
        self.batch_size = batch_size
        self.identity = ModelIdentity(
            manifest.name, manifest.version, manifest.weights_sha256, manifest.demo, manifest.task
        )
        self._lock = threading.Lock()
        # torchvision is untyped: name the ResNet's parts once, as typed modules
        self._trunk = [
            self.net.get_submodule(name)
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ]
        self._avgpool = self.net.get_submodule("avgpool")
        fc = self.net.get_submodule("fc")
        if not isinstance(fc, torch.nn.Linear):
            raise TypeError(f"not a ResNet: its fc is a {type(fc).__name__}")
        self._fc = fc

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for module in self._trunk:
            x = module(x)
        return x

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.manifest.task)

    def predict(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities [N, L] for a batch of input tensors [N, 3, S, S]."""
        return self.predict_with_cam(batch, cams=False)[0]

    def predict_with_cam(self, batch: torch.Tensor, cams: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, L] and raw class-activation maps [N, L, h, w] (before ReLU/normalising)."""
        probs, maps = [], []
        with self._lock, torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                x = batch[start : start + self.batch_size].to(self.device)
                feats = self._features(x)
                logits = self._fc(torch.flatten(self._avgpool(feats), 1))
                probs.append(self._probabilities(logits).float().cpu())
                if cams:
                    maps.append(torch.einsum("lc,nchw->nlhw", self._fc.weight, feats).float().cpu())
        p = torch.cat(probs).numpy() if probs else np.zeros((0, len(self.manifest.labels)), np.float32)
        m = torch.cat(maps).numpy() if maps else np.zeros((0,), np.float32)
        return p, m

    def positive(self, probs: np.ndarray) -> np.ndarray:
        """Which labels are positive: at or above threshold; for multiclass also the top class only."""
        return positive_call(probs, self.manifest.thresholds, self.manifest.task)


def normalise_cam(raw: np.ndarray) -> np.ndarray:
    """Grad-CAM normalisation: ReLU, then scaled to [0, 1] (all zero stays zero)."""
    cam = np.maximum(raw, 0)
    cam = cam - cam.min()
    peak = cam.max()
    return (cam / peak).astype(np.float32) if peak > 0 else cam.astype(np.float32)


def cam_to_source(raw: np.ndarray, frame: Frame, prep: Preprocessing) -> np.ndarray:
    """A raw h x w CAM upsampled to the model input, then mapped back onto the source image, in [0, 1]."""
    t = torch.from_numpy(np.maximum(raw, 0).astype(np.float32))[None, None]
    on_input = F.interpolate(t, size=(prep.input_size, prep.input_size), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()
    h, w = frame.display.shape[:2]
    return normalise_cam(map_to_source(on_input, geometry(h, w, prep)))


def overlay(frame: Frame, cam: np.ndarray, prep: Preprocessing, alpha: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 overlay at source size, CAM in [0, 1] at source size) with matplotlib's 'jet' map."""
    import matplotlib

    source_cam = cam if cam.shape == frame.display.shape[:2] else cam_to_source(cam, frame, prep)
    heat = matplotlib.colormaps["jet"](source_cam)[..., :3]
    blended = (1 - alpha) * frame.display.astype(np.float32) / 255.0 + alpha * heat
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8), source_cam


# --- loading ----------------------------------------------------------------------------------

_cache: dict[tuple[str, str], Classifier] = {}
_cache_lock = threading.Lock()


def imagenet_weights_path(settings: ModelSettings) -> Path:
    """Where the torchvision ImageNet file is looked for: the config, else $TORCH_HOME/hub/checkpoints."""
    if settings.imagenet_weights:
        return Path(settings.imagenet_weights).expanduser()
    torch_home = Path(
        os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch")
    ).expanduser()
    return torch_home / "hub" / "checkpoints" / IMAGENET_FILE


def imagenet_manifest(weights: Path) -> Manifest:
    """The manifest of torchvision's ImageNet ResNet-18 (1000 labels, top class)."""
    categories = list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    sha = sha256_file(weights)
    if not sha.startswith(IMAGENET_SHA256_PREFIX):
        log.warning(
            "%s: sha256 %s does not start with torchvision's published %s", weights, sha[:12], IMAGENET_SHA256_PREFIX
        )
    return Manifest(
        name="torchvision-resnet18-imagenet",
        version="IMAGENET1K_V1",
        labels=categories,
        task="multiclass",
        thresholds=[0.0] * len(categories),
        preprocessing=Preprocessing(224, "center_crop", "replicate", (), IMAGENET_MEAN, IMAGENET_STD),
        weights_file=weights.name,
        weights_sha256=sha,
        description="General ImageNet classifier (1000 everyday object classes), not a medical model.",
    )


def demo_network() -> tuple[torch.nn.Module, Manifest]:
    """The untrained demo model: ResNet-18 with a fixed seed, five chest-finding labels."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(DEMO_SEED)
    net = resnet18(len(DEMO_LABELS))
    torch.random.set_rng_state(gen_state)
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    manifest = Manifest(
        name="dxnode-demo",
        version="0-untrained",
        labels=list(DEMO_LABELS),
        task="multilabel",
        thresholds=[0.5] * len(DEMO_LABELS),
        preprocessing=Preprocessing(),
        weights_file="(built in)",
        weights_sha256=h.hexdigest(),
        demo=True,
        description="UNTRAINED DEMO MODEL: random weights with a fixed seed. Its findings are meaningless; configure [model] bundle.",
    )
    return net, manifest


def load_network(bundle: Path, manifest: Manifest) -> torch.nn.Module:
    """A resnet18 with the bundle's verified weights loaded."""
    weights = verify_weights(bundle, manifest)
    net = resnet18(len(manifest.labels))
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise BundleError(
            f"model weights {weights} are not a ResNet-18 state dict for {len(manifest.labels)} labels: {exc}"[:500]
        ) from exc
    return net


def load_classifier(settings: ModelSettings, bundle: str | Path | None = None) -> Classifier:
    """The configured model, loaded once per process (bundle > [model] bundle > ImageNet > demo)."""
    chosen = str(bundle or settings.bundle or "")
    device = choose_device(settings.device)
    if not chosen:
        imagenet = imagenet_weights_path(settings)
        chosen = f"imagenet:{imagenet}" if imagenet.is_file() else "demo"
        if settings.imagenet_weights and not imagenet.is_file():
            raise BundleError(
                f"[model] imagenet_weights = {settings.imagenet_weights!r}: no such file (expected torchvision's {IMAGENET_FILE})"
            )
    key = (chosen, str(device))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if chosen == "demo":
            net, manifest = demo_network()
        elif chosen.startswith("imagenet:"):
            weights = Path(chosen.split(":", 1)[1])
            manifest = imagenet_manifest(weights)
            net = resnet18(1000)
            try:
                net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise BundleError(f"{weights} is not torchvision's ResNet-18 ImageNet state dict: {exc}"[:500]) from exc
        else:
            path = Path(chosen).expanduser()
            manifest = load_manifest(path)
            net = load_network(path, manifest)
        classifier = Classifier(net, manifest, device, settings.batch_size)
        _cache[key] = classifier
        return classifier


# --- studies and files ------------------------------------------------------------------------


@dataclass
class _Input:
    sop_instance_uid: str
    frame: Frame


def _run_frames(classifier: Classifier, frames: list[_Input]) -> tuple[np.ndarray, np.ndarray]:
    prep = classifier.manifest.preprocessing
    if not frames:
        return np.zeros((0, len(classifier.manifest.labels))), np.zeros((0,))
    return classifier.predict_with_cam(torch.stack([to_tensor(f.frame, prep) for f in frames]))


def _heatmap_labels(findings: list[Finding], heatmap_for: str) -> list[Finding]:
    if heatmap_for == "all":
        return findings
    if heatmap_for == "top1":
        return findings[:1]
    return [f for f in findings if f.positive]


def analyze_study(
    study_instance_uid: str,
    instances: list[tuple[str, Path]],
    classifier: Classifier,
    settings: Settings,
    heatmap_for: str = "positive",
) -> StudyResult:
    """Run every eligible instance of a study; one bad instance fails alone with its reason."""
    prep = classifier.manifest.preprocessing
    outcomes: dict[str, InstanceOutcome] = {}
    inputs: list[_Input] = []
    for uid, path in instances:
        try:
            ds = read_dataset(path)
            reason = skip_reason(ds, settings.pipeline)
            if reason:
                outcomes[uid] = InstanceOutcome(uid, "skipped", reason)
                continue
            frames = read_frames(ds, settings.pipeline, prep)
        except PipelineError as exc:
            outcomes[uid] = InstanceOutcome(uid, "failed", str(exc))
            continue
        inputs += [_Input(uid, f) for f in frames]
    probs, cams = _run_frames(classifier, inputs)
    labels = classifier.manifest.labels
    for uid in dict.fromkeys(i.sop_instance_uid for i in inputs):
        rows = [k for k, i in enumerate(inputs) if i.sop_instance_uid == uid]
        per_label = probs[rows].max(axis=0)
        top = np.argsort(per_label)[::-1][:MAX_STORED_FINDINGS] if len(labels) > 20 else range(len(labels))
        outcomes[uid] = InstanceOutcome(uid, "done", "", {labels[j]: float(per_label[j]) for j in top})
    findings: list[Finding] = []
    heatmaps: list[Heatmap] = []
    if inputs:
        study, driver = aggregate(probs, settings.model.aggregate)
        positive = classifier.positive(study)
        order = np.argsort(study)[::-1]
        if len(labels) > 20:
            order = order[:MAX_STORED_FINDINGS]
        for j in order:
            src = inputs[driver[j]]
            findings.append(
                Finding(
                    labels[j],
                    float(study[j]),
                    float(classifier.manifest.thresholds[j]),
                    bool(positive[j]),
                    src.sop_instance_uid,
                    src.frame.frame_index,
                )
            )
        for f in _heatmap_labels(findings, heatmap_for):
            j = labels.index(f.label)
            src = inputs[driver[j]]
            rgb, cam = overlay(src.frame, cams[driver[j], j], prep)
            heatmaps.append(Heatmap(f.label, src.sop_instance_uid, src.frame.frame_index, rgb, cam))
    ordered = [outcomes[uid] for uid, _ in instances if uid in outcomes]
    return StudyResult(study_instance_uid, classifier.identity, findings, ordered, heatmaps)


@dataclass
class FilePrediction:
    """The result of `dxnode predict` / POST /api/predict for one file."""

    file: str
    findings: list[Finding]
    model: ModelIdentity
    heatmap: np.ndarray | None  # RGB overlay for the top finding
    error: str | None = None
    display: np.ndarray | None = None  # the windowed image the heatmap is drawn on

    def to_dict(self, heatmap_path: str | None = None) -> dict[str, Any]:
        """The JSON object of `dxnode predict --json`."""
        return {
            "file": self.file,
            "findings": [
                {
                    "label": f.label,
                    "probability": round(f.probability, 6),
                    "positive": f.positive,
                    "threshold": f.threshold,
                }
                for f in self.findings
            ],
            "model": {"name": self.model.name, "version": self.model.version, "demo": self.model.demo},
            "heatmap": heatmap_path,
            "error": self.error,
        }


def predict_file(path: Path, classifier: Classifier, settings: Settings, top_k: int | None = None) -> FilePrediction:
    """Predict one DICOM/PNG/JPEG file (all its frames, aggregated); errors come back in .error."""
    prep = classifier.manifest.preprocessing
    try:
        frames = read_frames(Path(path), settings.pipeline, prep)
    except PipelineError as exc:
        return FilePrediction(str(path), [], classifier.identity, None, str(exc))
    probs, cams = _run_frames(classifier, [_Input(f.sop_instance_uid, f) for f in frames])
    agg, driver = aggregate(probs, settings.model.aggregate)
    positive = classifier.positive(agg)
    labels = classifier.manifest.labels
    order = np.argsort(agg)[::-1][: top_k or len(labels)]
    findings = [
        Finding(
            labels[j],
            float(agg[j]),
            float(classifier.manifest.thresholds[j]),
            bool(positive[j]),
            frames[driver[j]].sop_instance_uid or None,
            frames[driver[j]].frame_index,
        )
        for j in order
    ]
    j = int(order[0])
    rgb, _ = overlay(frames[driver[j]], cams[driver[j], j], prep)
    return FilePrediction(str(path), findings, classifier.identity, rgb, None, frames[driver[j]].display)


def save_png(rgb: np.ndarray, path: Path) -> Path:
    """Write an RGB uint8 array as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path

"""ResNet-18 model bundles, batched inference, study-level aggregation and Grad-CAM overlays.

A bundle is a folder: ``weights.pt`` (a torchvision resnet18 state dict with fc sized to the
labels) and ``manifest.json`` (name, version, labels, task, thresholds, preprocessing, sha256 of
the weights, checked at load), and ``model.onnx`` with its sha256 for the ONNX Runtime engine
(dxnode.engine runs the network; see there). Nothing is ever downloaded: with no bundle configured, dxnode
serves torchvision's ImageNet classifier if ``resnet18-f37072fd.pth`` is on disk, else an
untrained demo model that says so in every output.

Grad-CAM: ResNet-18 ends in global average pooling and one linear layer, so the gradient of a
class logit with respect to each layer4 channel is that class's fc weight divided by the map
size, the same at every position. Grad-CAM's channel weights are therefore the fc weights, and
the map is ``relu(sum_c w[l, c] * A_c)``, computed here in the forward pass, with no backward pass
(tests/test_model.py checks it against pytorch-grad-cam's backward-pass GradCAM).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from dxnode.config import ModelSettings, Settings
from dxnode.engine import Engine, TorchEngine, bundle_onnx, cached_onnx, choose_engine
from dxnode.intended import DEMO_NAME, DEMO_USE, IntendedUse
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
    onnx_file: str = ""  # model.onnx, run by the ONNX Runtime engine (dxnode.engine)
    onnx_sha256: str = ""
    quantization: dict[str, Any] = field(default_factory=dict)  # set on int8 bundles (dxnode model quantize)
    intended_use: IntendedUse | None = None  # what the model is for (dxnode.intended); None: not declared, any image

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
            "onnx_file": self.onnx_file,
            "onnx_sha256": self.onnx_sha256,
            "quantization": self.quantization,
            **({"intended_use": self.intended_use.to_dict()} if self.intended_use else {}),
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
    intended_use: IntendedUse | None = None,
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
        intended_use=intended_use,
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
            onnx_file=d.get("onnx_file", ""),
            onnx_sha256=d.get("onnx_sha256", ""),
            quantization=dict(d.get("quantization") or {}),
            intended_use=IntendedUse.from_dict(d["intended_use"]) if d.get("intended_use") is not None else None,
        )
    except FileNotFoundError:
        raise BundleError(f"model bundle {path}: no manifest.json") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"model bundle {path}: manifest.json is invalid: {exc}") from None
    _validate(m, str(file))
    return m


def save_manifest(path: Path, manifest: Manifest) -> None:
    """Write manifest.json into the bundle folder path (atomically)."""
    _validate(manifest, str(path))
    tmp = Path(path) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2))
    tmp.replace(Path(path) / "manifest.json")


def verify_file(path: Path, expected_sha256: str, what: str) -> Path:
    """path, after checking it exists and its sha256 is the manifest's; BundleError naming both otherwise."""
    if not path.is_file():
        raise BundleError(f"{what} missing: {path} (expected sha256 {expected_sha256})")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise BundleError(
            f"{what} {path} does not match the manifest: sha256 {actual}, expected {expected_sha256}; refusing to load"
        )
    return path


def verify_weights(path: Path, manifest: Manifest) -> Path:
    """The weights file, after checking it exists and matches the manifest's sha256."""
    return verify_file(Path(path) / manifest.weights_file, manifest.weights_sha256, "model weights")


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
    """A loaded ResNet-18 with its manifest and inference engine (dxnode.engine); thread-safe inference."""

    def __init__(
        self,
        net: torch.nn.Module,
        manifest: Manifest,
        device: torch.device,
        batch_size: int = 8,
        engine: Engine | None = None,
        engine_reason: str = "",
    ) -> None:
        self.net = net.eval() if engine else net.to(device).eval()
        self.manifest = manifest
        self.device = device
        self.batch_size = batch_size
        self.engine: Engine = engine or TorchEngine(self.net, manifest.task, device)
        self.engine_reason = engine_reason or "PyTorch"
        self.identity = ModelIdentity(
            manifest.name, manifest.version, manifest.weights_sha256, manifest.demo, manifest.task
        )
        self._lock = threading.Lock()

    def predict(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities [N, L] for a batch of input tensors [N, 3, S, S]."""
        return self.predict_with_cam(batch, cams=False)[0]

    def forward(self, batch: torch.Tensor, cams: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: probabilities [N, L] and raw layer4 CAMs [N, L, h, w] (before ReLU).

        The whole engine contract of a batch; another runtime (e.g. ONNX Runtime) can replace it.
        Without cams the second array is empty.
        """
        with self._lock:
            probs, maps = self.engine.forward(batch, cams)
        return probs, (maps if maps is not None else np.zeros((0,), np.float32))

    def predict_with_cam(self, batch: torch.Tensor, cams: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, L] and raw class-activation maps [N, L, h, w] (before ReLU/normalising)."""
        probs, maps = [], []
        for start in range(0, len(batch), self.batch_size):
            p, m = self.forward(batch[start : start + self.batch_size], cams)
            probs.append(p)
            maps.append(m)
        if not probs:
            return np.zeros((0, len(self.manifest.labels)), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(probs), (np.concatenate(maps) if cams else maps[0])

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
    """A raw h x w CAM upsampled to the model input, then mapped back onto the frame's display image, in [0, 1].

    The letterbox/crop undone is the one to_tensor applied to the frame's model image; the
    display is that image's extent at its own (possibly smaller) size.
    """
    t = torch.from_numpy(np.maximum(raw, 0).astype(np.float32))[None, None]
    on_input = F.interpolate(t, size=(prep.input_size, prep.input_size), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()
    h, w = frame.display.shape[:2]
    return normalise_cam(map_to_source(on_input, geometry(*frame.image_shape, prep), (h, w)))


def overlay(frame: Frame, cam: np.ndarray, prep: Preprocessing, alpha: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 overlay, CAM in [0, 1]), both at the frame's display size, with matplotlib's 'jet' map.

    The map's 256 colours are looked up the way matplotlib quantises a float in [0, 1], and the
    blend runs in float32 in place: a radiograph-sized overlay costs a fraction of a second.
    """
    source_cam = cam if cam.shape == frame.display.shape[:2] else cam_to_source(cam, frame, prep)
    index = np.minimum((source_cam * 256).astype(np.intp), 255)
    blended = frame.display.astype(np.float32)
    blended *= 1 - alpha
    blended += _jet_lut(alpha)[index]
    np.clip(blended, 0, 255, out=blended)
    return np.rint(blended).astype(np.uint8), source_cam


@functools.cache
def _jet_lut(alpha: float) -> np.ndarray:
    """matplotlib's 'jet' colours as 256 x 3 float32 in 0-255, scaled by alpha."""
    import matplotlib

    return (matplotlib.colormaps["jet"](np.arange(256))[:, :3] * 255 * alpha).astype(np.float32)


# --- loading ----------------------------------------------------------------------------------

_cache: dict[tuple[str, str, str, str], Classifier] = {}
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
        intended_use=None,  # general purpose: declares nothing
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
        name=DEMO_NAME,
        version="0-untrained",
        labels=list(DEMO_LABELS),
        task="multilabel",
        thresholds=[0.5] * len(DEMO_LABELS),
        preprocessing=Preprocessing(),
        weights_file="(built in)",
        weights_sha256=h.hexdigest(),
        demo=True,
        intended_use=DEMO_USE,
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


def load_classifier(
    settings: ModelSettings, bundle: str | Path | None = None, data_dir: Path | None = None
) -> Classifier:
    """The configured model, loaded once per process (bundle > [model] bundle > ImageNet > demo).

    The engine follows [model] engine (dxnode.engine.choose_engine); the built-in demo and ImageNet
    models are exported to ONNX once, under data_dir (without one they run in PyTorch).
    """
    chosen = str(bundle or settings.bundle or "")
    device = choose_device(settings.device)
    if not chosen:
        imagenet = imagenet_weights_path(settings)
        chosen = f"imagenet:{imagenet}" if imagenet.is_file() else "demo"
        if settings.imagenet_weights and not imagenet.is_file():
            raise BundleError(
                f"[model] imagenet_weights = {settings.imagenet_weights!r}: no such file (expected torchvision's {IMAGENET_FILE})"
            )
    key = (chosen, str(device), settings.engine, str(data_dir))
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
        onnx, note = _onnx_for(chosen, net, manifest, settings, data_dir)
        engine, reason = choose_engine(
            settings.engine, device, settings.device, net, manifest, onnx, note, settings.threads
        )
        (log.info if engine.name == "onnxruntime" or settings.engine == "torch" else log.warning)(
            "model %s %s: engine %s (%s)", manifest.name, manifest.version, engine.name, reason
        )
        classifier = Classifier(net, manifest, device, settings.batch_size, engine, reason)
        _cache[key] = classifier
        return classifier


def _onnx_for(
    chosen: str, net: torch.nn.Module, manifest: Manifest, settings: ModelSettings, data_dir: Path | None
) -> tuple[Path | None, str]:
    """The verified ONNX model of a bundle, or the built-in model's cached export, or why there is none."""
    if chosen != "demo" and not chosen.startswith("imagenet:"):
        return bundle_onnx(Path(chosen).expanduser(), manifest)
    if settings.engine == "torch":
        return None, "[model] engine = 'torch'"
    if data_dir is None:
        return None, "no data_dir given to cache the built-in model's ONNX export in"
    cache = Path(data_dir) / "model-cache"
    try:
        return cached_onnx(net, manifest, cache), f"exported once to {cache}"
    except (OSError, RuntimeError) as exc:
        return None, f"could not export the built-in model to {cache}: {exc}"


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


@dataclass
class _Decoded:
    """One instance after the pixel chain: its model inputs (frame index, tensor, display-only frame), or why it has none."""

    sop_instance_uid: str
    inputs: list[tuple[int, torch.Tensor, Frame]]  # the Frame without its model image
    outcome: InstanceOutcome | None  # skipped or failed
    seconds: float  # read + decode + window + resize, in the decoding thread
    notes: str = ""  # what the pixel chain noted (e.g. a non-finite window it did not use)


def _decode_instance(uid: str, path: Path, settings: Settings, prep: Preprocessing) -> _Decoded:
    """Read one instance into model inputs; only the display image of each frame is kept beside them."""
    start = time.perf_counter()
    try:
        ds = read_dataset(path, settings.pipeline.max_decoded_mb)
        reason = skip_reason(ds, settings.pipeline)
        if reason:
            return _Decoded(uid, [], InstanceOutcome(uid, "skipped", reason), time.perf_counter() - start)
        frames = read_frames(ds, settings.pipeline, prep, display_max_side=settings.report.sc_max_side)
    except PipelineError as exc:
        return _Decoded(uid, [], InstanceOutcome(uid, "failed", str(exc)), time.perf_counter() - start)
    inputs = [(f.frame_index, to_tensor(f, prep), f.without_image()) for f in frames]
    notes = "; ".join(dict.fromkeys(n for f in frames for n in f.notes))
    return _Decoded(uid, inputs, None, time.perf_counter() - start, notes)


def _prefetched(
    pool: ThreadPoolExecutor, instances: list[tuple[str, Path]], settings: Settings, prep: Preprocessing, ahead: int
) -> Generator[Future[_Decoded], None, None]:
    """Decoding futures in study order, at most `ahead` submitted beyond the one being consumed."""
    pending: deque[Future[_Decoded]] = deque()
    try:
        for uid, path in instances:
            pending.append(pool.submit(_decode_instance, uid, path, settings, prep))
            if len(pending) > ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:  # closed early (an error mid-study): drop the decodes not started yet
        for future in pending:
            future.cancel()


_pools: dict[int, ThreadPoolExecutor] = {}


def _decode_pool(threads: int) -> ThreadPoolExecutor:
    """The process's decoding threads, kept across jobs (new threads per job would each get fresh malloc arenas)."""
    with _cache_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dxnode-decode")
        return _pools[threads]


class _RunningStudy:
    """The study result so far: per label the best (or summed) probability, its driver and raw CAM."""

    def __init__(self, n_labels: int) -> None:
        self.best = np.full(n_labels, -np.inf, np.float32)
        self.total = np.zeros(n_labels, np.float64)
        self.frames = 0
        self.driver: list[tuple[str, int]] = [("", 0)] * n_labels
        self.cams: np.ndarray | None = None  # [L, h, w] raw CAM of each label's driver frame

    def fold(self, probs: np.ndarray, cams: np.ndarray, keys: list[tuple[str, int]]) -> None:
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
        """Study probability per label: max (or mean) over every frame folded in."""
        return (self.total / self.frames).astype(np.float32) if aggregate == "mean" else self.best


def _driver_frame(path: Path, frame_index: int, settings: Settings, prep: Preprocessing) -> Frame:
    """Re-read the one frame that drove a finding, for its heatmap."""
    (frame,) = read_frames(
        path, settings.pipeline, prep, frames=[frame_index], display_max_side=settings.report.sc_max_side
    )
    return frame


def analyze_study(
    study_instance_uid: str,
    instances: list[tuple[str, Path]],
    classifier: Classifier,
    settings: Settings,
    heatmap_for: str = "positive",
    progress: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> StudyResult:
    """Run every eligible instance of a study; one bad instance fails alone with its reason.

    Streaming: a small thread pool decodes the next instances while the model runs a batch of
    batch_size inputs; each batch is folded into a running study result and dropped, so memory is
    bounded by the batch and the prefetch, not the study. Heatmaps are made afterwards on the
    driver frames: the display images of up to batch_size current drivers are kept (a small
    study needs no second read), the others are re-read. progress(stage) is called between batches and stages;
    timings gets decode, decode_wait, model and cam seconds added.
    """
    prep = classifier.manifest.preprocessing
    labels = classifier.manifest.labels
    tick = progress or (lambda stage: None)
    spent = timings if timings is not None else {}
    for stage in ("decode", "decode_wait", "model", "cam"):
        spent.setdefault(stage, 0.0)
    outcomes: dict[str, InstanceOutcome] = {}
    running = _RunningStudy(len(labels))
    per_instance: dict[str, list[Any]] = {}  # uid -> [frames not yet run, max probabilities so far, notes]
    waiting: list[tuple[str, int, torch.Tensor, Frame]] = []  # inputs decoded, not yet run
    kept: dict[tuple[str, int], Frame] = {}  # display images of current drivers, at most batch_size

    def run_batch(batch: list[tuple[str, int, torch.Tensor, Frame]]) -> None:
        start = time.perf_counter()
        probs, cams = classifier.forward(torch.stack([x for _, _, x, _ in batch]))
        spent["model"] += time.perf_counter() - start
        running.fold(probs, cams, [(uid, i) for uid, i, _, _ in batch])
        drivers = set(running.driver)
        kept.update({(uid, i): shown for uid, i, _, shown in batch if (uid, i) in drivers})
        for key in [k for k in kept if k not in drivers]:
            del kept[key]
        while len(kept) > classifier.batch_size:
            del kept[next(iter(kept))]  # the oldest; re-read at the end if it still drives a label
        for (uid, _, _, _), p in zip(batch, probs, strict=True):
            state = per_instance[uid]
            state[0] -= 1
            state[1] = p if state[1] is None else np.maximum(state[1], p)
            if state[0] == 0:
                _, best, notes = per_instance.pop(uid)
                top = np.argsort(best)[::-1][:MAX_STORED_FINDINGS] if len(labels) > 20 else range(len(labels))
                outcomes[uid] = InstanceOutcome(uid, "done", notes, {labels[j]: float(best[j]) for j in top})
        tick("model")

    tick("decode")
    threads = settings.model.decode_threads
    futures = _prefetched(_decode_pool(threads), instances, settings, prep, ahead=classifier.batch_size + threads)
    try:
        for future in futures:
            start = time.perf_counter()
            decoded = future.result()
            spent["decode_wait"] += time.perf_counter() - start
            spent["decode"] += decoded.seconds
            if decoded.outcome is not None:
                outcomes[decoded.sop_instance_uid] = decoded.outcome
                continue
            if decoded.inputs:
                per_instance[decoded.sop_instance_uid] = [len(decoded.inputs), None, decoded.notes]
            waiting += [(decoded.sop_instance_uid, i, x, shown) for i, x, shown in decoded.inputs]
            while len(waiting) >= classifier.batch_size:
                run_batch(waiting[: classifier.batch_size])
                del waiting[: classifier.batch_size]
    finally:
        futures.close()
    if waiting:
        run_batch(waiting)
        waiting.clear()

    findings: list[Finding] = []
    heatmaps: list[Heatmap] = []
    if running.frames:
        study = running.study(settings.model.aggregate)
        positive = classifier.positive(study)
        order = np.argsort(study)[::-1]
        if len(labels) > 20:
            order = order[:MAX_STORED_FINDINGS]
        for j in order:
            uid, frame_index = running.driver[j]
            findings.append(
                Finding(
                    labels[j],
                    float(study[j]),
                    float(classifier.manifest.thresholds[j]),
                    bool(positive[j]),
                    uid,
                    frame_index,
                )
            )
        tick("cam")
        start = time.perf_counter()
        paths = dict(instances)
        frames: dict[tuple[str, int], Frame] = {}
        assert running.cams is not None
        for f in _heatmap_labels(findings, heatmap_for):
            j = labels.index(f.label)
            key = running.driver[j]
            if key in kept:
                frames[key] = kept.pop(key)
            elif key not in frames:
                frames[key] = _driver_frame(paths[key[0]], key[1], settings, prep)
            rgb, cam = overlay(frames[key], running.cams[j], prep)
            heatmaps.append(Heatmap(f.label, key[0], key[1], rgb, cam))
        spent["cam"] += time.perf_counter() - start
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
        frames = read_frames(Path(path), settings.pipeline, prep, display_max_side=settings.report.sc_max_side)
    except PipelineError as exc:
        return FilePrediction(str(path), [], classifier.identity, None, str(exc))
    if not frames:
        return FilePrediction(str(path), [], classifier.identity, None, "no frame to analyse")
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

"""The ResNet-18 classifier: loading the configured model into its engine, batched inference, and Grad-CAM.

Bundles on disk and the built-in models are dxnode.inference.bundle; the engines that run the network are
dxnode.inference.engine; studies are streamed through the classifier by dxnode.analysis.streaming, single files by
dxnode.analysis.predict.

Grad-CAM: ResNet-18 ends in global average pooling and one linear layer, so the gradient of a
class logit with respect to each layer4 channel is that class's fc weight divided by the map
size, the same at every position. Grad-CAM's channel weights are therefore the fc weights, and
the map is ``relu(sum_c w[l, c] * A_c)``, computed here in the forward pass, with no backward pass
(tests/test_model.py checks it against pytorch-grad-cam's backward-pass GradCAM).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dxnode.config import ModelSettings
from dxnode.extras import TRAIN_EXTRA, has_torch
from dxnode.inference.bundle import (
    IMAGENET_FILE,
    BundleError,
    Manifest,
    bundle_fc_weight,
    demo_manifest,
    demo_weights,
    imagenet_network,
    imagenet_weights_path,
    load_manifest,
    load_network,
    torch_network,
)
from dxnode.inference.engine import (
    Engine,
    TorchEngine,
    bundle_onnx,
    cached_onnx,
    choose_engine,
    resnet18_onnx,
    serving_device,
    torch_export,
)
from dxnode.pipeline import Frame, Preprocessing, geometry, map_to_source, resize_planes
from dxnode.pixels.colormap import overlay_tables
from dxnode.results import Finding, ModelIdentity
from dxnode.states import Task

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dxnode.model")

MAX_STORED_FINDINGS = 10  # multi-class models with many labels keep their top findings only


def probabilities(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Model outputs as probabilities: softmax over the labels for multiclass, a sigmoid per label otherwise."""
    import torch  # training and evaluation in PyTorch: dxnode[train]

    return torch.softmax(logits, dim=1) if task == Task.MULTICLASS else torch.sigmoid(logits)


def positive_call(probs: np.ndarray, thresholds: Sequence[float], task: Task) -> np.ndarray:
    """Which labels are positive, for one row [L] or rows [N, L]: at or above the label's threshold,
    and for multiclass only the top class of its row. (The node, evaluation and training all call this.)"""
    rows = np.atleast_2d(probs)
    pos = rows >= np.asarray(thresholds, dtype=np.float64)
    if task == Task.MULTICLASS and len(rows):
        top = np.zeros_like(pos)
        top[np.arange(len(rows)), rows.argmax(axis=1)] = True
        pos &= top
    return pos.reshape(np.shape(probs))


class Classifier:
    """A loaded ResNet-18 with its manifest and inference engine (dxnode.inference.engine); thread-safe inference."""

    def __init__(
        self,
        net: torch.nn.Module | None,
        manifest: Manifest,
        device: Any,
        batch_size: int = 8,
        engine: Engine | None = None,
        engine_reason: str = "",
    ) -> None:
        """net: the PyTorch network (None when the engine is ONNX Runtime and none was loaded); without
        an engine, it runs in the torch engine on device."""
        self.net = net.eval() if net is not None else None
        self.manifest = manifest
        self.device = str(device)
        self.batch_size = batch_size
        if engine is None:
            if net is None:
                raise ValueError("a Classifier needs an engine or a network")
            engine = TorchEngine(net, manifest.task, device)
        self.engine: Engine = engine
        self.engine_reason = engine_reason or "PyTorch"
        self.identity = ModelIdentity(
            manifest.name,
            manifest.version,
            manifest.weights_sha256,
            manifest.demo,
            manifest.task,
            tuple((label, *code) for label, code in manifest.codes.items()),
        )
        self._lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [N, L] for a batch of input tensors [N, 3, S, S]."""
        return self.predict_with_cam(batch, cams=False)[0]

    def forward(self, batch: np.ndarray, cams: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: probabilities [N, L] and raw layer4 CAMs [N, L, h, w] (before ReLU).

        The whole engine contract of a batch; another runtime (e.g. ONNX Runtime) can replace it.
        Without cams the second array is empty.
        """
        with self._lock:
            probs, maps = self.engine.forward(batch, cams)
        return probs, (maps if maps is not None else np.zeros((0,), np.float32))

    def predict_with_cam(self, batch: np.ndarray, cams: bool = True) -> tuple[np.ndarray, np.ndarray]:
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

    def findings(
        self, probs: np.ndarray, drivers: Sequence[tuple[str | None, int]], limit: int | None = None
    ) -> list[Finding]:
        """Findings of aggregated probabilities [L], most probable first (at most limit), each naming the
        (SOP Instance UID, frame index) that drove it."""
        positive = self.positive(probs)
        thresholds = self.manifest.thresholds
        return [
            Finding(self.manifest.labels[j], float(probs[j]), float(thresholds[j]), bool(positive[j]), *drivers[j])
            for j in np.argsort(probs)[::-1][:limit]
        ]


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
    on_input = resize_planes(np.maximum(raw, 0)[np.newaxis], (prep.input_size, prep.input_size))[0]
    h, w = frame.display.shape[:2]
    return normalise_cam(map_to_source(on_input, geometry(*frame.image_shape, prep), (h, w)))


def overlay(frame: Frame, cam: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 overlay, CAM in [0, 1]), both at the frame's display size, with matplotlib's 'jet' map.

    Low activations fade out (dxnode.pixels.colormap.overlay_opacity): no tint below a floor, then
    an opacity rising with the map, so the anatomy under a weak map stays as the viewer shows it.
    The map's 256 colours are looked up the way matplotlib quantises a float in [0, 1], and the
    blend runs in float32 in place: a radiograph-sized overlay costs a fraction of a second.
    """
    source_cam = cam if cam.shape == frame.display.shape[:2] else cam_to_source(cam, frame, prep)
    index = np.minimum((source_cam * 256).astype(np.intp), 255)
    tint, keep = overlay_tables()
    blended = frame.display.astype(np.float32)
    blended *= keep[index][..., np.newaxis]
    blended += tint[index]
    np.clip(blended, 0, 255, out=blended)
    return np.rint(blended).astype(np.uint8), source_cam


# --- loading ----------------------------------------------------------------------------------


class ModelRegistry:
    """The models and decoding threads of one process, each made once: the process that serves (a job
    process, the web app) creates one and passes it on; a test makes its own."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str, str], Classifier] = {}
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def get(
        self, settings: ModelSettings, bundle: str | Path | None = None, data_dir: Path | None = None
    ) -> Classifier:
        """The configured model (see load_classifier), loaded on the first call and kept."""
        chosen, device = chosen_model(settings, bundle), serving_device(settings.device)
        key = (chosen, device, settings.engine, str(data_dir))
        with self._lock:
            if key not in self._models:
                self._models[key] = _load(chosen, device, settings, data_dir)
            return self._models[key]

    def decode_pool(self, threads: int) -> ThreadPoolExecutor:
        """The process's decoding threads, kept across jobs (new threads per job would each get fresh malloc arenas)."""
        with self._lock:
            if threads not in self._pools:
                self._pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dxnode-decode")
            return self._pools[threads]

    def close(self) -> None:
        """Stop the decoding threads (the models need no closing)."""
        with self._lock:
            for pool in self._pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            self._pools.clear()


def load_classifier(
    settings: ModelSettings, bundle: str | Path | None = None, data_dir: Path | None = None
) -> Classifier:
    """The configured model, loaded now (bundle > [model] bundle > ImageNet > demo); ModelRegistry.get keeps it.

    The engine follows [model] engine (dxnode.inference.engine.choose_engine); the built-in demo and ImageNet
    models are written to ONNX once, under data_dir (without one they run in PyTorch). Without
    PyTorch (no dxnode[train]): bundles run from their model.onnx, the demo from its ONNX graph,
    and an ImageNet file on disk is not used unless configured (then it is a one-line error).
    """
    return _load(chosen_model(settings, bundle), serving_device(settings.device), settings, data_dir)


def chosen_model(settings: ModelSettings, bundle: str | Path | None = None) -> str:
    """Which model serves: a bundle folder, 'imagenet:<file>' or 'demo'."""
    chosen = str(bundle or settings.bundle or "")
    if chosen:
        return chosen
    imagenet = imagenet_weights_path(settings)
    if settings.imagenet_weights and not imagenet.is_file():
        raise BundleError(
            f"[model] imagenet_weights = {settings.imagenet_weights!r}: no such file (expected torchvision's {IMAGENET_FILE})"
        )
    if not imagenet.is_file():
        return "demo"
    if not settings.imagenet_weights and not has_torch():
        log.warning("%s not used: reading it needs PyTorch (%s); serving the demo model", imagenet, TRAIN_EXTRA)
        return "demo"
    return f"imagenet:{imagenet}"


def _load(chosen: str, device: str, settings: ModelSettings, data_dir: Path | None) -> Classifier:
    """Load the chosen model into the engine [model] engine asks for."""
    build: Callable[[Path], None] | None = None
    if chosen == "demo":
        weights = demo_weights()
        manifest, fc = demo_manifest(weights), weights["fc.weight"]

        def load_net() -> torch.nn.Module:
            return torch_network(weights)

        def build_demo(path: Path) -> None:
            resnet18_onnx(weights, path)

        build = build_demo
    elif chosen.startswith("imagenet:"):
        net, manifest = imagenet_network(Path(chosen.split(":", 1)[1]))
        resnet: Any = net  # a torchvision ResNet: its fc layer is looked up by name
        fc = resnet.fc.weight.detach().cpu().numpy()
        build = torch_export(net, manifest.preprocessing.input_size)

        def load_net() -> torch.nn.Module:
            return net

    else:
        path = Path(chosen).expanduser()
        manifest = load_manifest(path)
        fc = bundle_fc_weight(path, manifest)

        def load_net() -> torch.nn.Module:
            return load_network(path, manifest)

    onnx, note = _onnx_for(chosen, build, manifest, settings, data_dir)
    engine, reason = choose_engine(
        settings.engine, device, settings.device, load_net, fc, manifest, onnx, note, settings.threads
    )
    (log.info if engine.name == "onnxruntime" or settings.engine == "torch" else log.warning)(
        "model %s %s: engine %s (%s)", manifest.name, manifest.version, engine.name, reason
    )
    return Classifier(getattr(engine, "net", None), manifest, device, settings.batch_size, engine, reason)


def _onnx_for(
    chosen: str,
    build: Callable[[Path], None] | None,
    manifest: Manifest,
    settings: ModelSettings,
    data_dir: Path | None,
) -> tuple[Path | None, str]:
    """The verified ONNX model of a bundle, or the built-in model's cached ONNX file, or why there is none."""
    if build is None:
        return bundle_onnx(Path(chosen).expanduser(), manifest)
    if settings.engine == "torch":
        return None, "[model] engine = 'torch'"
    if data_dir is None:
        return None, "no data_dir given to cache the built-in model's ONNX file in"
    cache = Path(data_dir) / "model-cache"
    try:
        return cached_onnx(build, manifest, cache), f"built once in {cache}"
    except (OSError, RuntimeError) as exc:
        return None, f"could not build the built-in model's ONNX file in {cache}: {exc}"

"""ResNet-18 model bundles, batched inference, study-level aggregation and Grad-CAM overlays.

A bundle is a folder: ``weights.pt`` (a torchvision resnet18 state dict with fc sized to the
labels) and ``manifest.json`` (name, version, labels, task, thresholds, preprocessing, sha256 of
the weights, checked at load), and ``model.onnx`` with its sha256 for the ONNX Runtime engine
(dxnode.engine runs the network; see there). Nothing is ever downloaded: with no bundle configured, dxnode
serves torchvision's ImageNet classifier if ``resnet18-f37072fd.pth`` is on disk (and PyTorch is
installed), else an untrained demo model that says so in every output.

Serving needs no PyTorch: a bundle's model.onnx runs in ONNX Runtime with the fc weights read from
weights.pt by a small reader of torch's file format (read_state_dict), and the demo model is
built as an ONNX graph from NumPy weights. PyTorch (``dxnode[train]``) is imported inside the
functions that need it only: writing weights, the torch engine, ImageNet.

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
from typing import TYPE_CHECKING, Any

import numpy as np

from dxnode.colormap import jet_table
from dxnode.config import ModelSettings, Settings
from dxnode.engine import (
    FEATURES,
    INPUT,
    LOGITS,
    TRAIN_EXTRA,
    Engine,
    TorchEngine,
    bundle_onnx,
    cached_onnx,
    choose_engine,
    has_torch,
    require_torch,
    torch_export,
)
from dxnode.intended import DEMO_NAME, DEMO_USE, IntendedUse
from dxnode.pipeline import (
    Frame,
    PipelineError,
    Preprocessing,
    geometry,
    map_to_source,
    read_dataset,
    read_frames,
    resize_planes,
    skip_reason,
    to_tensor,
)
from dxnode.results import Finding, Heatmap, InstanceOutcome, ModelIdentity, StudyResult

if TYPE_CHECKING:
    import torch

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
    import torch  # weights.pt is written by torch.save: dxnode[train] (training, init-imagenet)

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
    import torchvision  # the PyTorch network: dxnode[train]

    return torchvision.models.resnet18(weights=None, num_classes=num_labels)


def choose_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU (PyTorch's device: training and the torch engine)."""
    import torch  # dxnode[train]

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BundleError(f"[model] device = {name!r} but CUDA is not available")
    return torch.device(name)


def serving_device(name: str) -> str:
    """[model] device for inference: choose_device where PyTorch is installed; without it, the CPU.

    (Without PyTorch, CUDA is ONNX Runtime's alone: 'cuda' asks onnxruntime-gpu for it.)
    """
    if has_torch():
        return str(choose_device(name))
    return "cpu" if name == "auto" else name


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Model outputs as probabilities: softmax over the labels for multiclass, a sigmoid per label otherwise."""
    import torch  # training and evaluation in PyTorch: dxnode[train]

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
            manifest.name, manifest.version, manifest.weights_sha256, manifest.demo, manifest.task
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
    return (jet_table() * 255 * alpha).astype(np.float32)


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
    require_torch(f"the ImageNet weights file {weights}")
    import torchvision  # its category names: dxnode[train]

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


def _resnet18_layout(num_labels: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of torchvision's resnet18 (state-dict names and shapes, BN statistics included), in its order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
    cin = 64
    for layer, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p, stride = f"layer{layer}.{block}", 2 if layer > 1 and block == 0 else 1
            shapes += [(f"{p}.conv1.weight", (cout, cin, 3, 3)), *_bn(f"{p}.bn1", cout)]
            shapes += [(f"{p}.conv2.weight", (cout, cout, 3, 3)), *_bn(f"{p}.bn2", cout)]
            if stride != 1 or cin != cout:
                shapes += [(f"{p}.downsample.0.weight", (cout, cin, 1, 1)), *_bn(f"{p}.downsample.1", cout)]
            cin = cout
    return [*shapes, ("fc.weight", (num_labels, 512)), ("fc.bias", (num_labels,))]


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{k}", (channels,)) for k in ("weight", "bias", "running_mean", "running_var")]


def demo_weights() -> dict[str, np.ndarray]:
    """The untrained demo model's ResNet-18 weights (torchvision names), from a NumPy generator with a fixed seed.

    Convolutions He-normal (fan out, as torchvision initialises them), batch norms the identity,
    fc uniform in +-1/sqrt(512) (as a fresh torch Linear): deterministic, and no torch needed.
    """
    rng = np.random.default_rng(DEMO_SEED)
    weights: dict[str, np.ndarray] = {}
    for name, shape in _resnet18_layout(len(DEMO_LABELS)):
        if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            weights[name] = np.ones(shape, np.float32)
        elif name.endswith(("running_mean", ".bias")) and not name.startswith("fc."):
            weights[name] = np.zeros(shape, np.float32)
        elif name.startswith("fc."):
            weights[name] = rng.uniform(-(512**-0.5), 512**-0.5, shape).astype(np.float32)
        else:
            fan_out = shape[0] * shape[2] * shape[3]
            weights[name] = (rng.standard_normal(shape, np.float32) * np.float32((2.0 / fan_out) ** 0.5)).astype(
                np.float32
            )
    return weights


def demo_manifest(weights: dict[str, np.ndarray]) -> Manifest:
    """The demo model's manifest; its weights_sha256 is over the names and bytes of its weights."""
    h = hashlib.sha256()
    for k, v in weights.items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return Manifest(
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


def torch_network(weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """torchvision's resnet18 holding these (NumPy) weights: the demo model in the torch engine."""
    import torch  # the torch engine: dxnode[train]

    net = resnet18(len(weights["fc.bias"]))
    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
    state.update({k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")})
    net.load_state_dict(state)
    return net.eval()


def demo_network() -> tuple[torch.nn.Module, Manifest]:
    """The untrained demo model in PyTorch (needs dxnode[train]): the same weights as its ONNX graph."""
    weights = demo_weights()
    return torch_network(weights), demo_manifest(weights)


def resnet18_onnx(weights: dict[str, np.ndarray], path: Path, bn_epsilon: float = 1e-5) -> Path:
    """Write torchvision's ResNet-18 forward pass with these weights as an ONNX graph, atomically.

    The graph dxnode.engine exports from PyTorch: input 'input' [n, 3, S, S], outputs 'logits'
    [n, L] and layer4's 'features' [n, 512, h, w], batch size dynamic. Built with onnx.helper,
    without torch.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    count = [0]

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        count[0] += 1
        out = f"{op.lower()}_{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv_bn(x: str, conv: str, bn: str, stride: int, relu: bool) -> str:
        k = weights[f"{conv}.weight"].shape[-1]
        y = node("Conv", [x, f"{conv}.weight"], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        y = node("BatchNormalization", [y, *(f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var"))])
        nodes[-1].attribute.append(helper.make_attribute("epsilon", bn_epsilon))
        return node("Relu", [y]) if relu else y

    x = conv_bn(INPUT, "conv1", "bn1", 2, True)
    x = node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for layer in range(1, 5):
        for block in range(2):
            p, stride = f"layer{layer}.{block}", 2 if layer > 1 and block == 0 else 1
            y = conv_bn(x, f"{p}.conv1", f"{p}.bn1", stride, True)
            y = conv_bn(y, f"{p}.conv2", f"{p}.bn2", 1, False)
            shortcut = (
                conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", stride, False)
                if f"{p}.downsample.0.weight" in weights
                else x
            )
            x = node("Relu", [node("Add", [y, shortcut])])
    nodes.append(helper.make_node("Identity", [x], [FEATURES]))
    pooled = node("Flatten", [node("GlobalAveragePool", [x])], axis=1)
    nodes.append(helper.make_node("Gemm", [pooled, "fc.weight", "fc.bias"], [LOGITS], transB=1))
    labels = len(weights["fc.bias"])
    graph = helper.make_graph(
        nodes,
        "resnet18",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["n", 3, "s", "s"])],
        [
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["n", labels]),
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["n", 512, "h", "w"]),
        ],
        [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dxnode")
    model.ir_version = 8  # what every onnxruntime since 1.10 reads
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_TORCH_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A state dict written by torch.save (its zip format), as NumPy arrays, without torch.

    Only tensors in (Ordered)dicts are understood: any other object in the pickle is refused, as
    torch.load(weights_only=True) refuses it.
    """
    import pickle
    import zipfile
    from collections import OrderedDict

    def rebuild(
        storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
    ) -> np.ndarray:
        item = storage.itemsize
        return np.lib.stride_tricks.as_strided(
            storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
        ).copy()

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = names[0].split("/", 1)[0]
        if f"{root}/byteorder" in names and z.read(f"{root}/byteorder").strip() != b"little":
            raise ValueError("only little-endian tensor files are supported")

        class Reader(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) == ("collections", "OrderedDict"):
                    return OrderedDict
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return rebuild
                if module == "torch" and name in _TORCH_STORAGES:
                    return np.dtype(_TORCH_STORAGES[name])
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

            def persistent_load(self, pid: Any) -> np.ndarray:
                _, dtype, key, _location, _numel = pid
                return np.frombuffer(z.read(f"{root}/data/{key}"), dtype=dtype)

        with z.open(f"{root}/data.pkl") as f:
            state = Reader(f).load()
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    return dict(state)


def bundle_fc_weight(bundle: Path, manifest: Manifest) -> np.ndarray:
    """The fc weights [L, 512] of a bundle's verified weights.pt (they make ONNX Runtime's CAMs), without torch."""
    weights = verify_weights(bundle, manifest)
    try:
        fc = read_state_dict(weights)["fc.weight"]
    except Exception as exc:
        raise BundleError(f"model weights {weights}: cannot read fc.weight: {exc}"[:500]) from exc
    if fc.shape != (len(manifest.labels), 512):
        raise BundleError(
            f"model weights {weights}: fc.weight is {list(fc.shape)}, not [{len(manifest.labels)}, 512] for its labels"
        )
    return fc.astype(np.float32)


def load_network(bundle: Path, manifest: Manifest) -> torch.nn.Module:
    """A resnet18 with the bundle's verified weights loaded (needs dxnode[train])."""
    require_torch(f"loading {bundle}/{manifest.weights_file} into PyTorch")
    import torch  # dxnode[train]

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
    models are written to ONNX once, under data_dir (without one they run in PyTorch). Without
    PyTorch (no dxnode[train]): bundles run from their model.onnx, the demo from its ONNX graph,
    and an ImageNet file on disk is not used unless configured (then it is a one-line error).
    """
    chosen = str(bundle or settings.bundle or "")
    device = serving_device(settings.device)
    if not chosen:
        imagenet = imagenet_weights_path(settings)
        if settings.imagenet_weights and not imagenet.is_file():
            raise BundleError(
                f"[model] imagenet_weights = {settings.imagenet_weights!r}: no such file (expected torchvision's {IMAGENET_FILE})"
            )
        chosen = f"imagenet:{imagenet}" if imagenet.is_file() else "demo"
        if chosen != "demo" and not settings.imagenet_weights and not has_torch():
            log.warning("%s not used: reading it needs PyTorch (%s); serving the demo model", imagenet, TRAIN_EXTRA)
            chosen = "demo"
    key = (chosen, device, settings.engine, str(data_dir))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        net: Any = None
        build: Callable[[Path], None] | None
        if chosen == "demo":
            weights = demo_weights()
            manifest = demo_manifest(weights)
            fc = weights["fc.weight"]

            def load_net() -> torch.nn.Module:
                return torch_network(weights)

            def build_demo(path: Path) -> None:
                resnet18_onnx(weights, path)

            build = build_demo

        elif chosen.startswith("imagenet:"):
            pth = Path(chosen.split(":", 1)[1])
            manifest = imagenet_manifest(pth)  # (requires torch, in one line)
            import torch  # reading torchvision's .pth: dxnode[train]

            net = resnet18(1000)
            try:
                net.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise BundleError(f"{pth} is not torchvision's ResNet-18 ImageNet state dict: {exc}"[:500]) from exc
            fc = net.fc.weight.detach().cpu().numpy()
            build = torch_export(net, manifest.preprocessing.input_size)

            def load_net() -> torch.nn.Module:
                return net

        else:
            path = Path(chosen).expanduser()
            manifest = load_manifest(path)
            fc = bundle_fc_weight(path, manifest)

            def load_net() -> torch.nn.Module:
                return load_network(path, manifest)

            build = None
        onnx, note = _onnx_for(chosen, build, manifest, settings, data_dir)
        engine, reason = choose_engine(
            settings.engine, device, settings.device, load_net, fc, manifest, onnx, note, settings.threads
        )
        (log.info if engine.name == "onnxruntime" or settings.engine == "torch" else log.warning)(
            "model %s %s: engine %s (%s)", manifest.name, manifest.version, engine.name, reason
        )
        classifier = Classifier(getattr(engine, "net", None), manifest, device, settings.batch_size, engine, reason)
        _cache[key] = classifier
        return classifier


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


# --- studies and files ------------------------------------------------------------------------


@dataclass
class _Input:
    sop_instance_uid: str
    frame: Frame


def _run_frames(classifier: Classifier, frames: list[_Input]) -> tuple[np.ndarray, np.ndarray]:
    prep = classifier.manifest.preprocessing
    if not frames:
        return np.zeros((0, len(classifier.manifest.labels))), np.zeros((0,))
    return classifier.predict_with_cam(np.stack([to_tensor(f.frame, prep) for f in frames]))


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
    inputs: list[tuple[int, np.ndarray, Frame]]  # the Frame without its model image
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
    waiting: list[tuple[str, int, np.ndarray, Frame]] = []  # inputs decoded, not yet run
    kept: dict[tuple[str, int], Frame] = {}  # display images of current drivers, at most batch_size

    def run_batch(batch: list[tuple[str, int, np.ndarray, Frame]]) -> None:
        start = time.perf_counter()
        probs, cams = classifier.forward(np.stack([x for _, _, x, _ in batch]))
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

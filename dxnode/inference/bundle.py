"""Model bundles on disk: the manifest, writing and loading a bundle, checksums, and the built-in models.

A bundle is a folder: ``weights.pt`` (a torchvision resnet18 state dict with fc sized to the
labels) and ``manifest.json`` (name, version, labels, task, thresholds, preprocessing, sha256 of
the weights, checked at load; optional standard codes of the labels, dxnode.inference.codes), and ``model.onnx`` with its sha256 for the ONNX Runtime engine
(dxnode.inference.engine). Nothing is ever downloaded: with no bundle configured, dxnode serves
torchvision's ImageNet classifier if ``resnet18-f37072fd.pth`` is on disk (and PyTorch is
installed), else an untrained demo model that says so in every output (its weights come from a
seeded NumPy generator, see demo_weights).

The fc weights are read from weights.pt without torch (read_state_dict); PyTorch (``dxnode[train]``)
is imported inside the functions that need it only: writing weights, loading a network, ImageNet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dxnode.config import ModelSettings
from dxnode.durable import durable_path, write_durably
from dxnode.extras import TRAIN_EXTRA, has_torch
from dxnode.inference.codes import CHEST_CODES, CodeError, LabelCode, parse_codes
from dxnode.inference.intended import DEMO_NAME, DEMO_USE, IntendedUse
from dxnode.pipeline import Preprocessing
from dxnode.states import Task

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dxnode.model")

IMAGENET_FILE = "resnet18-f37072fd.pth"
IMAGENET_SHA256_PREFIX = "f37072fd"  # torchvision names its files by their sha256 prefix
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEMO_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule", "Pneumothorax"]
DEMO_SEED = 20261125


class BundleError(Exception):
    """A model bundle is missing, malformed or its weights do not match the manifest."""


@dataclass(frozen=True)
class Manifest:
    """What a bundle says about itself (manifest.json)."""

    name: str
    version: str
    labels: list[str]
    task: Task
    thresholds: list[float]
    preprocessing: Preprocessing
    weights_file: str = "weights.pt"
    weights_sha256: str = ""
    demo: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    onnx_file: str = ""  # model.onnx, run by the ONNX Runtime engine (dxnode.inference.engine)
    onnx_sha256: str = ""
    quantization: dict[str, Any] = field(default_factory=dict)  # set on int8 bundles (dxnode model quantize)
    intended_use: IntendedUse | None = (
        None  # what the model is for (dxnode.inference.intended); None: not declared, any image
    )
    codes: dict[str, LabelCode] = field(default_factory=dict)  # label -> (value, scheme, meaning); others: 99DXNODE

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
            **({"codes": {label: list(code) for label, code in self.codes.items()}} if self.codes else {}),
        }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _validate(m: Manifest, where: str) -> None:
    if m.task not in tuple(Task):
        raise BundleError(f"{where}: task must be multilabel or multiclass, not {m.task!r}")
    if not m.labels or len(m.thresholds) != len(m.labels):
        raise BundleError(
            f"{where}: needs labels and one threshold per label ({len(m.labels)} labels, {len(m.thresholds)} thresholds)"
        )
    try:
        parse_codes(m.codes, m.labels)
    except CodeError as exc:
        raise BundleError(f"{where}: {exc}") from None


def write_bundle(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    name: str,
    version: str,
    labels: list[str],
    task: Task,
    thresholds: list[float],
    preprocessing: Preprocessing,
    demo: bool = False,
    description: str = "",
    extra: dict[str, Any] | None = None,
    intended_use: IntendedUse | None = None,
    codes: dict[str, LabelCode] | None = None,
) -> Manifest:
    """Write weights.pt and manifest.json (with the weights' sha256) into the folder path."""
    import torch  # weights.pt is written by torch.save: dxnode[train] (training, init-imagenet)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "weights.pt"
    with durable_path(weights) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
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
        codes=dict(codes or {}),
    )
    save_manifest(path, manifest)
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
            task=Task(d["task"]) if d["task"] in tuple(Task) else d["task"],  # _validate names a wrong one
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
            codes=parse_codes(d.get("codes"), d["labels"]),
        )
    except FileNotFoundError:
        raise BundleError(f"model bundle {path}: no manifest.json") from None
    except (KeyError, ValueError, TypeError) as exc:  # a CodeError is a ValueError
        raise BundleError(f"model bundle {path}: manifest.json is invalid: {exc}") from None
    _validate(m, str(file))
    return m


def save_manifest(path: Path, manifest: Manifest) -> None:
    """Write manifest.json into the bundle folder path (atomically)."""
    _validate(manifest, str(path))
    write_durably(Path(path) / "manifest.json", json.dumps(manifest.to_dict(), indent=2).encode())


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


def require_torch(what: str) -> None:
    """BundleError in one line naming the extra to install, unless PyTorch is installed."""
    if not has_torch():
        raise BundleError(f"{what} needs PyTorch, which this install does not have: {TRAIN_EXTRA}")


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
        task=Task.MULTICLASS,
        thresholds=[0.0] * len(categories),
        preprocessing=Preprocessing(224, "center_crop", "replicate", (), IMAGENET_MEAN, IMAGENET_STD),
        weights_file=weights.name,
        weights_sha256=sha,
        description="General ImageNet classifier (1000 everyday object classes), not a medical model.",
        intended_use=None,  # general purpose: declares nothing
    )


def imagenet_network(weights: Path) -> tuple[torch.nn.Module, Manifest]:
    """torchvision's ImageNet ResNet-18 from its file, with its manifest (needs dxnode[train])."""
    manifest = imagenet_manifest(weights)  # (requires torch, in one line)
    import torch  # reading torchvision's .pth: dxnode[train]

    net = resnet18(1000)
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise BundleError(f"{weights} is not torchvision's ResNet-18 ImageNet state dict: {exc}"[:500]) from exc
    return net, manifest


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
        task=Task.MULTILABEL,
        thresholds=[0.5] * len(DEMO_LABELS),
        preprocessing=Preprocessing(),
        weights_file="(built in)",
        weights_sha256=h.hexdigest(),
        demo=True,
        intended_use=DEMO_USE,
        codes=dict(CHEST_CODES),
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

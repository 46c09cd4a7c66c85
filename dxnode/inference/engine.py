"""Inference engines behind one forward function: PyTorch, or ONNX Runtime on an exported model.

Both engines take a batch of model inputs [N, 3, S, S] and return the probabilities [N, L] and,
when asked, the raw class-activation maps [N, L, h, w]. The ONNX model has two outputs, the
logits and layer4's features; the CAM is the fc weights applied to the features, as with PyTorch
(see dxnode.model), so ONNX Runtime needs no backward pass either.

A bundle's ``model.onnx`` (fp32, or int8 from `dxnode model quantize`) is listed in its manifest
with its sha256 and checked at load like the weights. The built-in demo and ImageNet models are
written once into ``<data_dir>/model-cache`` beside a JSON file with both checksums, and rebuilt
when either does not match (the demo is built as an ONNX graph from NumPy weights, ImageNet is
exported from PyTorch).

Serving needs no torch: ONNX Runtime runs the model and the CAM is NumPy. PyTorch (the
``dxnode[train]`` extra) is imported inside the functions that need it: the torch engine, export
and quantisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dxnode.durable import durable_path, write_durably
from dxnode.extras import TRAIN_EXTRA, has_torch
from dxnode.inference.bundle import (
    BundleError,
    Manifest,
    load_manifest,
    load_network,
    require_torch,
    save_manifest,
    sha256_file,
    verify_file,
)
from dxnode.states import Task

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dxnode.inference.engine")

ONNX_FILE = "model.onnx"
INPUT, LOGITS, FEATURES = "input", "logits", "features"
CACHE_FOLDER = "model-cache"
EXPORT_TOLERANCE = 1e-4  # max |logit difference| accepted between the exported model and PyTorch


class Engine(Protocol):
    """What the classifier calls: probabilities and optionally raw CAMs of one batch."""

    name: str

    def forward(self, x: np.ndarray, cams: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities [N, L] (float32) and raw CAMs [N, L, h, w] when cams is true, of inputs [N, 3, S, S]."""
        ...


def probabilities(logits: np.ndarray, task: Task) -> np.ndarray:
    """Softmax for multiclass, else sigmoid per label, in float32 (as torch computes them)."""
    z = logits.astype(np.float32, copy=False)
    if task == Task.MULTICLASS:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-z))


def _cams(fc_weight: np.ndarray, features: np.ndarray) -> np.ndarray:
    n, c, h, w = features.shape
    return np.matmul(fc_weight, features.reshape(n, c, h * w)).reshape(n, -1, h, w)


def feature_net(net: torch.nn.Module) -> torch.nn.Module:
    """A torchvision ResNet returning (logits, layer4 features): the graph that is exported."""
    import torch  # PyTorch only here, in the torch engine and in export (dxnode[train])

    class FeatureNet(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net: Any = net  # a torchvision ResNet: its layers are looked up by name

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = self.net
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            feats = n.layer4(n.layer3(n.layer2(n.layer1(x))))
            return n.fc(torch.flatten(n.avgpool(feats), 1)), feats

    return FeatureNet(net)


class TorchEngine:
    """The network in PyTorch, on CPU or CUDA, under inference_mode (needs dxnode[train])."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, task: Task, device: str | torch.device) -> None:
        import torch  # the torch engine: dxnode[train]

        self.torch = torch
        self.device = torch.device(str(device))
        self.net: Any = net  # a torchvision ResNet (its fc weights make the CAMs)
        self.model = feature_net(net).to(self.device).eval()
        self.task = task

    def forward(self, x: np.ndarray, cams: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """See Engine.forward."""
        torch = self.torch
        with torch.inference_mode():
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            logits, feats = self.model(t.to(self.device))
            probs = torch.softmax(logits, dim=1) if self.task == Task.MULTICLASS else torch.sigmoid(logits)
            maps = torch.einsum("lc,nchw->nlhw", self.net.fc.weight, feats).float().cpu().numpy() if cams else None
        return probs.float().cpu().numpy(), maps


class OrtEngine:
    """An ONNX Runtime session on the exported model; the fc weights make the CAMs."""

    name = "onnxruntime"

    def __init__(self, session: Any, fc_weight: np.ndarray, task: Task) -> None:
        self.session = session
        self.fc_weight = np.ascontiguousarray(fc_weight, dtype=np.float32)
        self.task = task

    def forward(self, x: np.ndarray, cams: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """See Engine.forward."""
        arr = np.ascontiguousarray(x, dtype=np.float32)
        out = self.session.run([LOGITS, FEATURES] if cams else [LOGITS], {INPUT: arr})
        return probabilities(out[0], self.task), _cams(self.fc_weight, out[1]) if cams else None


def ort_session(path: Path, threads: int = 0, cuda: bool = False) -> Any:
    """An ONNX Runtime session: CUDA first when asked (and available), else CPU; threads 0 = ORT's default."""
    # start-up time: onnxruntime loads only when this runs
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)


def ort_has_cuda() -> bool:
    """Whether this onnxruntime has a CUDA provider (onnxruntime-gpu)."""
    # start-up time: onnxruntime loads only when this runs
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


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


# --- export -------------------------------------------------------------------------------------


def export_onnx(net: torch.nn.Module, path: Path, input_size: int) -> Path:
    """Write net as ONNX (inputs 'input', outputs 'logits' and 'features', dynamic batch), atomically."""
    import torch  # export runs the torch exporter: dxnode[train]

    model = feature_net(net).to("cpu").eval()
    x = torch.zeros(1, 3, input_size, input_size)
    names: dict[str, Any] = {"input_names": [INPUT], "output_names": [LOGITS, FEATURES]}
    with durable_path(Path(path)) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                **names,
                dynamic_axes={INPUT: {0: "n"}, LOGITS: {0: "n"}, FEATURES: {0: "n"}},
                dynamo=False,  # one self-contained file, in about a second
            )
        except ImportError as exc:  # a torch without the TorchScript exporter: the dynamo one (onnxscript)
            log.warning("TorchScript ONNX exporter not available (%s): exporting with torch.export", exc)
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                **names,
                dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=4096)}},
                dynamo=True,
                external_data=False,
            )
    return Path(path)


def check_export(net: torch.nn.Module, path: Path, input_size: int) -> float:
    """Max |logit difference| of the ONNX model against PyTorch on a fixed random batch; raises if too large."""
    import torch  # the reference is PyTorch: dxnode[train]

    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, ref_feats = feature_net(net).to("cpu").eval()(x)
    logits, feats = ort_session(path).run([LOGITS, FEATURES], {INPUT: x.numpy()})
    diff = max(float(np.abs(ref.numpy() - logits).max()), float(np.abs(ref_feats.numpy() - feats).max()))
    if diff > EXPORT_TOLERANCE:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} (limit {EXPORT_TOLERANCE})")
    return diff


def export_bundle(bundle: Path) -> Manifest:
    """Export a bundle's verified weights to model.onnx, check it against PyTorch, record its sha256."""
    require_torch("dxnode model export")
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    if manifest.quantization:
        raise BundleError(f"{bundle} is a quantised bundle: its model.onnx is the int8 model; export its fp32 source")
    net = load_network(bundle, manifest).eval()
    path = export_onnx(net, bundle / ONNX_FILE, manifest.preprocessing.input_size)
    check_export(net, path, manifest.preprocessing.input_size)
    manifest = dataclasses.replace(manifest, onnx_file=ONNX_FILE, onnx_sha256=sha256_file(path))
    save_manifest(bundle, manifest)
    return manifest


def bundle_onnx(bundle: Path, manifest: Manifest) -> tuple[Path | None, str]:
    """The bundle's verified model.onnx, or (None, why there is none); a mismatch is refused."""
    if not manifest.onnx_file:
        return None, f"bundle {bundle} has no model.onnx (older bundle): `dxnode model export {bundle}` adds one"
    path = verify_file(Path(bundle) / manifest.onnx_file, manifest.onnx_sha256, "ONNX model")
    return path, f"{manifest.onnx_file} sha256 matches"


def cached_onnx(build: Callable[[Path], None], manifest: Manifest, cache_dir: Path) -> Path:
    """The built-in model's ONNX file in cache_dir, built by build(path) (again if its checksums do not match)."""
    stem = f"{manifest.name}-{manifest.weights_sha256[:16]}-{manifest.preprocessing.input_size}"
    path, meta = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"
    try:
        recorded = json.loads(meta.read_text())
        if recorded["weights_sha256"] == manifest.weights_sha256 and recorded["onnx_sha256"] == sha256_file(path):
            return path
        log.warning("%s does not match its checksum in %s: building it again", path, meta.name)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not built yet (or half written): build now
    log.info("building the ONNX model of %s %s in %s (once)", manifest.name, manifest.version, path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    build(path)
    record = {"weights_sha256": manifest.weights_sha256, "onnx_sha256": sha256_file(path)}
    write_durably(meta, json.dumps(record).encode())
    return path


def torch_export(net: torch.nn.Module, input_size: int) -> Callable[[Path], None]:
    """A cached_onnx builder: export net from PyTorch and check the export against it."""

    def build(path: Path) -> None:
        net.eval()
        export_onnx(net, path, input_size)
        check_export(net, path, input_size)

    return build


def resnet18_onnx(weights: dict[str, np.ndarray], path: Path, bn_epsilon: float = 1e-5) -> Path:
    """Write torchvision's ResNet-18 forward pass with these weights as an ONNX graph, atomically.

    The graph dxnode.inference.engine exports from PyTorch: input 'input' [n, 3, S, S], outputs 'logits'
    [n, L] and layer4's 'features' [n, 512, h, w], batch size dynamic. Built with onnx.helper,
    without torch.
    """
    # start-up time: onnx loads only when this runs
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
    write_durably(Path(path), model.SerializeToString())
    return Path(path)


# --- choosing ------------------------------------------------------------------------------------


def choose_engine(  # noqa: C901  one decision table: engine wanted x device x int8 x onnx present
    wanted: str,
    device: str,
    device_setting: str,
    load_net: Callable[[], torch.nn.Module],
    fc_weight: np.ndarray,
    manifest: Manifest,
    onnx: Path | None,
    onnx_note: str,
    threads: int = 0,
) -> tuple[Engine, str]:
    """The engine for [model] engine (auto, torch, onnxruntime) and why it was chosen.

    onnx is the verified ONNX model (None when there is none, onnx_note then says why). auto is
    ONNX Runtime on CPU, and on CUDA only when onnxruntime-gpu runs there; int8 models always
    run in ONNX Runtime (on CPU when it has no CUDA). load_net gives the PyTorch network, called
    only when the torch engine runs (it needs dxnode[train]); fc_weight [L, 512] makes ONNX
    Runtime's CAMs.
    """
    # start-up time: onnxruntime loads only when this runs
    import onnxruntime as ort

    def torch_engine(why: str) -> TorchEngine:
        if not has_torch():
            raise BundleError(
                f"{manifest.name} {manifest.version} cannot run in ONNX Runtime ({why}) and this install has no "
                f"PyTorch to run it: {TRAIN_EXTRA}"
            )
        import torch  # the torch engine: dxnode[train]

        if threads:
            torch.set_num_threads(threads)
        return TorchEngine(load_net(), manifest.task, device)

    int8 = bool(manifest.quantization)
    if int8 and onnx is None:
        raise BundleError(f"int8 model {manifest.name} {manifest.version}: {onnx_note}")
    if int8 and wanted == "torch":
        raise BundleError(
            f"[model] engine = 'torch' cannot run {manifest.name} {manifest.version}: it is an int8 ONNX model; "
            "use engine 'auto' or 'onnxruntime', or its fp32 bundle"
        )
    if wanted == "torch":
        require_torch("[model] engine = 'torch'")
        return torch_engine(onnx_note), "[model] engine = 'torch'"
    if onnx is None:
        prefix = "ONNX Runtime not used" if wanted == "auto" else "[model] engine = 'onnxruntime' not possible"
        return torch_engine(onnx_note), f"{prefix}: {onnx_note}"
    cuda_problem = ""
    if device.startswith("cuda"):
        cuda_problem = "" if ort_has_cuda() else "onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)"
        if not cuda_problem:
            session = ort_session(onnx, threads, cuda=True)
            if session.get_providers()[0] != "CUDAExecutionProvider":
                cuda_problem = "onnxruntime-gpu is installed but could not start on CUDA"
    if cuda_problem and not int8:
        if wanted == "auto":
            return torch_engine(cuda_problem), f"torch on CUDA: {cuda_problem}"
        if device_setting != "auto":
            raise BundleError(f"[model] engine = 'onnxruntime' with device = {device_setting!r}: {cuda_problem}")
    if not device.startswith("cuda") or cuda_problem:
        session = ort_session(onnx, threads)
    provider = session.get_providers()[0]
    kind = "int8" if int8 else "fp32"
    reason = f"onnxruntime {ort.__version__} ({provider}, {kind}): {onnx_note}"
    if cuda_problem:
        reason += f"; on CPU because {cuda_problem}"
    return OrtEngine(session, fc_weight, manifest.task), reason

"""Inference benchmark: model stage (PyTorch vs ONNX Runtime), Grad-CAM overhead, decode+window.

    python -m bench.infer [--device cpu|cuda|auto] [--threads N] [--repeat N]

The model is the built-in untrained demo ResNet-18 (timing does not depend on the weights); the
ONNX model is exported from the same weights in the same run and checked against PyTorch first.
Decode+window uses real pydicom-data files: a 1955x1841 CR and a 512x512 CT, native and JPEG 2000;
"J2K CR to model input" compares the reduced-level JPEG 2000 decode ([pipeline] decode_max_side)
with the full-resolution path (decode_max_side = 0) in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import data_store
import numpy as np
import torch

from dxnode.config import PipelineSettings, WindowPreset
from dxnode.model import Classifier, choose_device, demo_network
from dxnode.pipeline import Preprocessing, read_frames, to_tensor

DATA = Path(data_store.__file__).parent / "data"
DECODE_FILES = {
    "CR 1955x1841 native": "RG1_UNCR.dcm",
    "CR 1955x1841 J2K lossless": "RG1_J2KR.dcm",
    "CT 512x512 native": "693_UNCR.dcm",
    "CT 512x512 J2K lossless": "693_J2KR.dcm",
}


def timed(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of fn in seconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(
    a: Callable[[], object], b: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Median times of a and b run alternately, so load from other processes hits both alike."""
    ta, tb = [], []
    for _ in range(repeat + 2):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return statistics.median(ta[2:]), statistics.median(tb[2:])


def onnx_session(net: torch.nn.Module, size: int, device: torch.device, threads: int):  # type: ignore[no-untyped-def]
    """Export net to ONNX (dynamic batch) and open an ONNX Runtime session on the same device kind."""
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp(prefix="dxnode-bench-")) / "resnet18.onnx"
    cpu_net = net.to("cpu").eval()
    x = torch.zeros(1, 3, size, size)
    warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
    try:
        torch.onnx.export(
            cpu_net,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
    except Exception:  # TorchScript exporter gone: the dynamo exporter (onnxscript)
        torch.onnx.export(
            cpu_net,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=64)}},
            dynamo=True,
        )
    net.to(device)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    available = [p for p in providers if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), opts, providers=available)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--repeat", type=int, default=10, help="timed repetitions per measurement (median reported)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net, manifest = demo_network()
    clf = Classifier(net, manifest, device, batch_size=8)
    prep: Preprocessing = manifest.preprocessing
    lung = PipelineSettings(windows=[WindowPreset(modality="CT", center=-600, width=1500)])

    frame = read_frames(DATA / "693_UNCR.dcm", lung, prep)[0]
    one = to_tensor(frame, prep)[None]
    rows: list[tuple[str, str]] = []
    print(
        f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else f'{args.threads} threads'}), "
        f"torch {torch.__version__}, input {prep.input_size}x{prep.input_size}, median of {args.repeat}"
    )

    import onnxruntime as ort

    session = onnx_session(clf.net, prep.input_size, device, args.threads)
    batch8 = one.repeat(8, 1, 1, 1)
    with torch.inference_mode():
        ref = clf.net(batch8.to(device)).float().cpu().numpy()
    got = session.run(None, {"input": batch8.numpy()})[0]
    max_diff = float(np.abs(ref - got).max())
    rows.append(
        (
            "ONNX Runtime vs PyTorch logits, max |diff|",
            f"{max_diff:.2e} (ORT {ort.__version__}, {session.get_providers()[0]})",
        )
    )

    for n in (1, 8):
        x = one.repeat(n, 1, 1, 1)
        x_dev = x.to(device)
        t_torch, t_ort = (
            t / n
            for t in timed_pair(
                lambda x_dev=x_dev: clf.predict(x_dev),
                lambda x=x: session.run(None, {"input": x.numpy()}),
                args.repeat,
                sync,
            )
        )
        t_plain, t_cam = (
            t / n
            for t in timed_pair(
                lambda x_dev=x_dev: clf.predict(x_dev),
                lambda x_dev=x_dev: clf.predict_with_cam(x_dev),
                args.repeat,
                sync,
            )
        )
        rows.append((f"model stage, batch {n}: PyTorch per image", f"{t_torch * 1e3:8.2f} ms"))
        rows.append(
            (
                f"model stage, batch {n}: ONNX Runtime per image",
                f"{t_ort * 1e3:8.2f} ms   (PyTorch/ORT = {t_torch / t_ort:.2f})",
            )
        )
        rows.append(
            (
                f"with fc-weight CAM, batch {n}: per image",
                f"{t_cam * 1e3:8.2f} ms   (CAM overhead {100 * (t_cam / t_plain - 1):+.1f}% of inference)",
            )
        )

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ref_net = clf.net
    with GradCAM(model=ref_net, target_layers=[ref_net.layer4[-1]]) as cam:
        t_plain1, t_bw = timed_pair(
            lambda: clf.predict(one.to(device)),
            lambda: cam(input_tensor=one.to(device), targets=[ClassifierOutputTarget(0)]),
            args.repeat,
            sync,
        )
    ref_net.eval()
    rows.append(
        (
            "backward-pass Grad-CAM (pytorch-grad-cam), batch 1",
            f"{t_bw * 1e3:8.2f} ms   ({100 * (t_bw / t_plain1 - 1):+.0f}% over inference)",
        )
    )

    lung_full = lung.model_copy(update={"decode_max_side": 0})  # every row below: full resolution
    for label, name in DECODE_FILES.items():
        path = DATA / name
        t_read = timed(lambda path=path: read_frames(path, lung_full, prep), args.repeat)
        f = read_frames(path, lung_full, prep)[0]
        t_tensor = timed(lambda f=f: to_tensor(f, prep), args.repeat)
        rows.append(
            (
                f"decode+LUT+window {label}, full size",
                f"{t_read * 1e3:8.2f} ms   (+ resize/normalise {t_tensor * 1e3:.2f} ms)",
            )
        )

    for name in ("RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        path = DATA / name
        t_full, t_reduced = timed_pair(
            lambda path=path: to_tensor(read_frames(path, lung_full, prep)[0], prep),
            lambda path=path: to_tensor(read_frames(path, lung, prep)[0], prep),
            args.repeat,
        )
        shape = read_frames(path, lung, prep)[0].image.shape
        rows.append(
            (
                f"J2K CR to model input, {name}",
                f"{t_reduced * 1e3:8.2f} ms at {shape[1]}x{shape[0]}   "
                f"(full resolution {t_full * 1e3:.2f} ms, ratio {t_reduced / t_full:.2f}, target <= 0.30)",
            )
        )

    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

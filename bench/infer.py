"""Inference benchmark: dxnode's ONNX Runtime engine vs a bare session, int8 vs fp32, PyTorch, decode.

    python -m bench.infer [--device cpu|cuda|auto] [--threads N] [--repeat N] [--no-auroc]

The timed model is the built-in untrained demo ResNet-18 (timing does not depend on the weights),
exported the way dxnode exports bundles (logits + layer4 features) and run by dxnode's engine; the
bare session runs a plain logits-only export of the same weights. The int8 model is quantised by
dxnode (calibrated on real pydicom-data images through the pipeline). The AUROC row trains the
small synthetic bundle of tests/test_engine.py, quantises it and evaluates both on its held-out
set (a few minutes on 2 cores; --no-auroc skips it).
Decode+window uses real pydicom-data files: a 1955x1841 CR and a 512x512 CT, native and JPEG 2000;
"J2K CR to model input" compares the reduced-level JPEG 2000 decode ([pipeline] decode_max_side)
with the full-resolution path (decode_max_side = 0) in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import data_store
import numpy as np
import torch

from dxnode.config import PipelineSettings, WindowPreset
from dxnode.inference.bundle import demo_network
from dxnode.inference.engine import OrtEngine, check_export, choose_device, export_onnx, ort_session
from dxnode.model import Classifier, normalise_cam
from dxnode.pipeline import Preprocessing, read_frames, to_tensor
from dxnode.training.quantize import calibration_batches, quantize_onnx

DATA = Path(data_store.__file__).parent / "data"
REAL_FILES = ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm"]
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


def bare_session(net: torch.nn.Module, size: int, path: Path, threads: int):  # type: ignore[no-untyped-def]
    """A plain logits-only ONNX export of net (what one would write by hand) in a default CPU session."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.to("cpu").eval(),
            (torch.zeros(1, 3, size, size),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def batch_rows(
    x: torch.Tensor,
    ort_clf: Classifier,
    int8_clf: Classifier,
    torch_clf: Classifier,
    bare: Any,
    device: torch.device,
    repeat: int,
    sync: Callable[[], None],
) -> list[tuple[str, str]]:
    """Per-image times of one batch: dxnode's ORT engine against the bare session, PyTorch and int8."""
    n, x_np, x_dev = len(x), x.numpy(), x.to(device)
    t_stage, t_bare = (
        t / n for t in timed_pair(lambda: ort_clf.predict_with_cam(x), lambda: bare.run(None, {"input": x_np}), repeat)
    )
    t_torch, t_stage2 = (
        t / n
        for t in timed_pair(
            lambda: torch_clf.predict_with_cam(x_dev), lambda: ort_clf.predict_with_cam(x), repeat, sync
        )
    )
    t_int8, t_fp32 = (
        t / n for t in timed_pair(lambda: int8_clf.predict_with_cam(x), lambda: ort_clf.predict_with_cam(x), repeat)
    )
    t_plain, t_cam = (
        t / n for t in timed_pair(lambda: ort_clf.predict(x), lambda: ort_clf.predict_with_cam(x), repeat)
    )
    return [
        (f"batch {n}: bare ORT session (logits only), per image", f"{t_bare * 1e3:8.2f} ms"),
        (
            f"batch {n}: dxnode model stage, ORT engine + CAM, per image",
            f"{t_stage * 1e3:8.2f} ms   (dxnode/bare = {t_stage / t_bare:.2f}, target <= 1.1)",
        ),
        (
            f"batch {n}: PyTorch engine + CAM, per image",
            f"{t_torch * 1e3:8.2f} ms   (PyTorch/ORT engine = {t_torch / t_stage2:.2f})",
        ),
        (
            f"batch {n}: int8 ORT engine + CAM, per image",
            f"{t_int8 * 1e3:8.2f} ms   (int8/fp32 = {t_int8 / t_fp32:.2f}, target <= 0.6)",
        ),
        (f"batch {n}: fc-weight CAM overhead (ORT engine)", f"{100 * (t_cam / t_plain - 1):+.1f}% of inference"),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="PyTorch's device: cpu, cuda or auto (default cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--repeat", type=int, default=20, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--no-auroc", action="store_true", help="skip the int8 vs fp32 AUROC (trains a small model)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    cpu = torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net, manifest = demo_network()
    prep: Preprocessing = manifest.preprocessing
    lung = PipelineSettings(windows=[WindowPreset(modality="CT", center=-600, width=1500)])
    tmp = Path(tempfile.mkdtemp(prefix="dxnode-bench-"))

    import onnxruntime as ort

    fp32_path = export_onnx(net, tmp / "model.onnx", prep.input_size)
    check_export(net, fp32_path, prep.input_size)
    fc = net.fc.weight.detach().cpu().numpy()
    ort_clf = Classifier(net, manifest, cpu, 8, OrtEngine(ort_session(fp32_path, args.threads), fc, manifest.task))
    bare = bare_session(net, prep.input_size, tmp / "bare.onnx", args.threads)
    real = [SimpleNamespace(path=DATA / n) for n in REAL_FILES]
    calibration = calibration_batches(real, SimpleNamespace(pipeline=lung), prep, max_images=len(real))
    quantize_onnx(fp32_path, tmp / "int8.onnx", calibration)
    int8_clf = Classifier(
        net, manifest, cpu, 8, OrtEngine(ort_session(tmp / "int8.onnx", args.threads), fc, manifest.task)
    )
    torch_clf = Classifier(net, manifest, device, batch_size=8)  # moves net to the device: after the exports

    rows: list[tuple[str, str]] = []
    print(
        f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else f'{args.threads} threads'}), "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, input {prep.input_size}x{prep.input_size}, "
        f"median of {args.repeat}",
        flush=True,
    )
    frames = [f for r in real for f in read_frames(r.path, lung, prep)]
    batch = torch.from_numpy(np.stack([to_tensor(f, prep) for f in frames]))
    p_ort, c_ort = ort_clf.predict_with_cam(batch)
    p_torch, c_torch = torch_clf.predict_with_cam(batch.to(device))
    cam_diff = max(
        float(np.abs(normalise_cam(c_ort[i, j]) - normalise_cam(c_torch[i, j])).max())
        for i in range(len(batch))
        for j in range(c_ort.shape[1])
    )
    rows.append(
        (
            f"ORT engine vs PyTorch, {len(batch)} real images",
            f"max |prob diff| {np.abs(p_ort - p_torch).max():.1e}, max |normalised CAM diff| {cam_diff:.1e}",
        )
    )

    one = batch[2:3]  # the CT
    for n in (1, 8):
        rows += batch_rows(one.repeat(n, 1, 1, 1), ort_clf, int8_clf, torch_clf, bare, device, args.repeat, sync)

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ref_net = torch_clf.net
    with GradCAM(model=ref_net, target_layers=[ref_net.layer4[-1]]) as cam:
        t_plain1, t_bw = timed_pair(
            lambda: torch_clf.predict(one.to(device)),
            lambda: cam(input_tensor=one.to(device), targets=[ClassifierOutputTarget(0)]),
            args.repeat,
            sync,
        )
    ref_net.eval()
    rows.append(
        (
            "backward-pass Grad-CAM (pytorch-grad-cam), batch 1",
            f"{t_bw * 1e3:8.2f} ms   ({100 * (t_bw / t_plain1 - 1):+.0f}% over PyTorch inference)",
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

    if not args.no_auroc:
        rows.append(auroc_row(tmp))

    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def auroc_row(tmp: Path) -> tuple[str, str]:
    """int8 minus fp32 AUROC on the held-out set of tests/test_engine.py (same recipe, same seeds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_engine import int8_against_fp32

    os.environ["TORCH_HOME"] = str(tmp / "torch-home")  # no ImageNet file: from scratch, as in the test
    start = time.perf_counter()
    metrics, _, _ = int8_against_fp32(tmp / "auroc")
    c = metrics["compare"]
    per_label = ", ".join(f"{k} {v['auroc_diff']:+.4f}" for k, v in c["labels"].items())
    return (
        "int8 - fp32 AUROC, held-out set of tests/test_engine.py",
        f"mean {c['mean_auroc_diff']:+.4f} ({per_label}; fp32 mean "
        f"{metrics['mean_auroc'] - c['mean_auroc_diff']:.3f}; {time.perf_counter() - start:.0f} s incl. training)",
    )


if __name__ == "__main__":
    raise SystemExit(main())

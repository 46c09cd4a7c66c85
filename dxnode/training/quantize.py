"""Static int8 quantisation of a bundle's ONNX model (`dxnode model quantize`), calibrated on the node's own inputs."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dxnode.config import Settings
from dxnode.durable import durable_path
from dxnode.inference.bundle import (
    BundleError,
    Manifest,
    load_manifest,
    load_network,
    require_torch,
    save_manifest,
    sha256_file,
)
from dxnode.inference.engine import INPUT, ONNX_FILE, bundle_onnx, check_export, export_onnx, ort_session
from dxnode.pipeline import PipelineError, Preprocessing, model_inputs

if TYPE_CHECKING:
    from dxnode.training.dataset import Sample

log = logging.getLogger("dxnode.inference.engine")


def quantize_onnx(
    source: Path, out: Path, batches: Iterator[np.ndarray], method: str = "minmax", reduce_range: bool = False
) -> dict[str, Any]:
    """Static int8 quantisation (QDQ, uint8 activations, int8 per-channel weights) calibrated on batches."""
    # start-up time: onnxruntime loads only when this runs
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {INPUT: batch}

    with tempfile.TemporaryDirectory(prefix="dxnode-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference and graph fusions, as ORT advises
        with durable_path(out) as written:
            quantize_static(
                str(prepared),
                str(written),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"CalibMaxIntermediateOutputs": 16},
            )
    return {
        "method": "static",
        "format": "QDQ",
        "activations": "uint8 per tensor",
        "weights": "int8 per channel" + (" (reduced range)" if reduce_range else ""),
        "calibration_method": method,
        "onnxruntime": ort.__version__,
    }


def calibration_batches(
    samples: list[Sample], settings: Settings, prep: Preprocessing, max_images: int, batch_size: int = 8
) -> Iterator[np.ndarray]:
    """Model inputs of the samples' frames, made by the node's own pipeline (pipeline.model_inputs: what
    serving feeds the model), in batches; unreadable files are skipped."""
    pending: list[np.ndarray] = []
    count = 0
    for s in samples:
        if count >= max_images:
            break
        try:
            inputs = model_inputs(s.path, settings.pipeline, prep)
        except PipelineError as exc:
            log.warning("calibration: left out %s: %s", s.path, exc)
            continue
        for x in inputs[: max_images - count]:
            pending.append(x)
            count += 1
            if len(pending) == batch_size:
                yield np.stack(pending)
                pending = []
    if pending:
        yield np.stack(pending)


def quantize_bundle(
    bundle: Path,
    calibration: Path,
    out: Path,
    settings: Settings,
    images: Path | None = None,
    max_images: int = 200,
    method: str = "minmax",
    reduce_range: bool = False,
    version: str = "",
) -> Manifest:
    """Write an int8 copy of a bundle to out: its ONNX model statically quantised, calibrated on the CSV's images."""
    # start-up time: loaded only when this runs
    import shutil

    from dxnode.training.dataset import read_table

    require_torch("dxnode model quantize")
    bundle, out = Path(bundle), Path(out)
    if out.resolve() == bundle.resolve():
        raise ValueError("--out must be a new folder, not the source bundle")
    source = load_manifest(bundle)
    if source.quantization:
        raise BundleError(f"{bundle} is already quantised")
    net = load_network(bundle, source).eval()
    table = read_table(calibration, images)
    if not table.samples:
        raise ValueError(f"{calibration}: no readable image to calibrate on")
    count = [0]

    def counted() -> Iterator[np.ndarray]:
        for batch in calibration_batches(table.samples, settings, source.preprocessing, max_images):
            count[0] += len(batch)
            yield batch

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dxnode-export-") as tmp:
        fp32, _ = bundle_onnx(bundle, source)
        if fp32 is None:  # an older bundle: export its weights here, the source bundle is left as it is
            fp32 = export_onnx(net, Path(tmp) / ONNX_FILE, source.preprocessing.input_size)
            check_export(net, fp32, source.preprocessing.input_size)
        record = quantize_onnx(fp32, out / ONNX_FILE, counted(), method, reduce_range)
        fp32_sha = sha256_file(fp32)
    if not count[0]:
        raise ValueError(f"{calibration}: none of its images could be read to calibrate on")
    ort_session(out / ONNX_FILE)  # it loads
    shutil.copy2(bundle / source.weights_file, out / source.weights_file)  # torch-side fc weights for the CAM
    if (bundle / "splits.csv").is_file():
        shutil.copy2(bundle / "splits.csv", out / "splits.csv")
    record["calibration"] = {"csv": str(calibration), "sha256": table.sha256, "images": count[0]}
    record["source"] = {
        "name": source.name,
        "version": source.version,
        "weights_sha256": source.weights_sha256,
        "onnx_sha256": fp32_sha,
    }
    manifest = dataclasses.replace(
        source,
        version=version or f"{source.version}-int8",
        description=f"{source.description} (int8, statically quantised by dxnode model quantize)".strip(),
        onnx_file=ONNX_FILE,
        onnx_sha256=sha256_file(out / ONNX_FILE),
        quantization=record,
    )
    save_manifest(out, manifest)
    return manifest

"""Model commands: predict, model info/init-imagenet/export/quantize, train and evaluate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxnode.cli.common import HelpFormatter, add_command, print_json
from dxnode.config import Settings
from dxnode.inference.codes import PRIVATE_SCHEME, uncoded

if TYPE_CHECKING:
    from dxnode.model import Classifier


def load_model_or_say_why(settings: Settings, bundle: str | None) -> Classifier | None:
    """The configured (or given) model, or None after printing why it cannot be loaded."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.inference.bundle import BundleError
    from dxnode.model import load_classifier

    try:
        return load_classifier(settings.model, bundle, settings.data_dir)
    except BundleError as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return None


def file_kind(path: Path) -> str | None:
    """'dicom' (DICM at byte 128, what the reader needs), 'image' (PNG or JPEG) or None."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.pipeline import is_image_file

    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM":
            return "dicom"
        return "image" if is_image_file(path) else None
    except OSError:
        return None


def predict_inputs(names: Sequence[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The files to analyse, each with why it cannot be (None if it can), and the arguments that name nothing usable.

    A folder stands for its DICOM, PNG and JPEG files, its subfolders included (hidden files and
    DICOMDIR left out); other files in it are passed over.
    """
    files: list[tuple[str, str | None]] = []
    refused: list[str] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found = [
                str(p)
                for p in sorted(path.rglob("*"))
                if p.name != "DICOMDIR"
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.is_file()
                and file_kind(p)
            ]
            if not found:
                refused.append(f"{name}: a folder with no DICOM, PNG or JPEG file")
            files += [(f, None) for f in found]
        elif not path.exists():
            refused.append(f"{name}: no such file or folder")
        elif not path.is_file():
            refused.append(f"{name}: not a file or folder")
        elif not os.access(path, os.R_OK):
            refused.append(f"{name}: cannot read it (permission denied)")
        else:
            kind = file_kind(path)
            files.append((name, None if kind else "not a DICOM file (no DICM prefix at byte 128), PNG or JPEG"))
    return files, refused


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    """Run the model on files and folders directly; exit 1 if any file failed, 2 if the model cannot load."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.analysis.predict import FilePrediction, predict_file, save_png
    from dxnode.schemas import PredictionOut

    files, refused = predict_inputs(args.files)
    if refused or all(error for _, error in files):  # say so before spending seconds on loading the model
        for line in refused or [f"{name}: {error}" for name, error in files]:
            print(f"dxnode predict: {line}", file=sys.stderr)
        return 1
    classifier = load_model_or_say_why(settings, args.model)
    if classifier is None:
        return 2
    ident = classifier.identity
    results, failed = [], 0
    for name, error in files:
        if error is None:
            pred = predict_file(Path(name), classifier, settings, top_k=args.top)
        else:
            pred = FilePrediction(name, [], ident, None, error)
        heatmap = None
        if pred.error is None and args.heatmap_dir and pred.heatmap is not None:
            safe = "".join(
                c if c.isalnum() or c in "-_." else "_" for c in f"{Path(name).stem}_{pred.findings[0].label}"
            )
            heatmap = str(save_png(pred.heatmap, Path(args.heatmap_dir) / f"{safe}.png"))
        failed += pred.error is not None
        results.append(PredictionOut.model_validate(pred.to_dict(heatmap)))
        if not args.json:
            if pred.error:
                print(f"{name}: ERROR {pred.error}")
                continue
            print(f"{name}:")
            for f in pred.findings:
                print(f"  {f.label:<32} {f.probability:7.3f}  {'POSITIVE' if f.positive else ''}")
            if heatmap:
                print(f"  heatmap: {heatmap}")
    if args.json:
        print_json(results)
    else:
        print(
            f"model: {ident.name} {ident.version}"
            + ("  ** UNTRAINED DEMO MODEL: findings are meaningless **" if ident.demo else "")
        )
    return 1 if failed else 0


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    """Print a bundle's manifest and check its weights."""
    classifier = load_model_or_say_why(settings, args.bundle)
    if classifier is None:
        return 1
    info = classifier.manifest.to_dict()
    if len(info["labels"]) > 20:
        info["labels"] = [*info["labels"][:10], f"... {len(info['labels']) - 10} more"]
        info["thresholds"] = info["thresholds"][:10]
    if classifier.manifest.intended_use is None:  # older bundles and ImageNet: any image
        # start-up time: only this command loads it (`dxnode --help` stays quick)
        from dxnode.inference.intended import NO_DECLARATION

        info["intended_use"] = NO_DECLARATION
    elif not args.json:
        info["intended_use"] = classifier.manifest.intended_use.describe()
    info["device"] = str(classifier.device)
    info["weights_check"] = "built-in demo weights" if classifier.manifest.demo else "sha256 matches"
    info["engine"] = classifier.engine.name
    info["engine_reason"] = classifier.engine_reason
    private = uncoded(classifier.manifest.labels, classifier.manifest.codes)
    if private:
        info["uncoded_labels"] = private if len(private) <= 20 else [*private[:10], f"... {len(private) - 10} more"]
        shown = ", ".join(private[:5]) + (f" and {len(private) - 5} more" if len(private) > 5 else "")
        print(
            f'dxnode: warning: {len(private)} label(s) have no standard code in the manifest\'s "codes"'
            f" (SNOMED CT, RadLex) and get a private {PRIVATE_SCHEME} code in the SR: {shown}",
            file=sys.stderr,
        )
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
        if classifier.manifest.demo:
            print("** UNTRAINED DEMO MODEL: its findings are meaningless. Set [model] bundle. **")
    return 0


def cmd_model_init_imagenet(args: argparse.Namespace, settings: Settings) -> int:
    """Make a bundle from the torchvision ImageNet weights file."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.extras import require_train_extra

    require_train_extra("init-imagenet")
    # start-up time, and torch is the optional dxnode[train] extra
    import torch

    from dxnode.inference.bundle import imagenet_manifest, imagenet_weights_path, write_bundle

    weights = Path(args.weights) if args.weights else imagenet_weights_path(settings.model)
    if not weights.is_file():
        print(
            f"dxnode: {weights}: no such file (torchvision's resnet18-f37072fd.pth; nothing is downloaded)",
            file=sys.stderr,
        )
        return 1
    m = imagenet_manifest(weights)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    out = write_bundle(
        Path(args.path),
        state,
        name=m.name,
        version=m.version,
        labels=m.labels,
        task=m.task,
        thresholds=m.thresholds,
        preprocessing=m.preprocessing,
        description=m.description,
        extra={"source": str(weights), "source_sha256": m.weights_sha256},
    )
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.inference.engine import export_bundle

    export_bundle(Path(args.path))  # model.onnx for the ONNX Runtime engine
    print(
        f"wrote bundle {args.path}: {out.name} {out.version}, {len(out.labels)} labels, sha256 {out.weights_sha256[:16]}..."
    )
    return 0


def cmd_model_export(args: argparse.Namespace, settings: Settings) -> int:
    """Add model.onnx (checked against PyTorch, sha256 in the manifest) to a bundle."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.inference.bundle import BundleError
    from dxnode.inference.engine import export_bundle

    try:
        m = export_bundle(Path(args.bundle))
    except (BundleError, RuntimeError) as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.bundle) / m.onnx_file} (sha256 {m.onnx_sha256[:16]}...)")
    return 0


def cmd_model_quantize(args: argparse.Namespace, settings: Settings) -> int:
    """Write an int8 copy of a bundle, calibrated on the images of a labelled CSV."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.inference.bundle import BundleError
    from dxnode.training.quantize import quantize_bundle

    try:
        m = quantize_bundle(
            Path(args.bundle),
            Path(args.calibration),
            Path(args.out),
            settings,
            Path(args.images) if args.images else None,
            args.max_images,
            args.method,
            args.reduce_range,
            args.version,
        )
    except (BundleError, ValueError, FileNotFoundError) as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote int8 bundle {args.out}: {m.name} {m.version}, calibrated on {m.quantization['calibration']['images']} images; "
        f"compare it with `dxnode evaluate {args.out} --data CSV --out DIR --compare {args.bundle}`"
    )
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Fine-tune ResNet-18 on a labelled CSV and write a bundle."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.extras import require_train_extra
    from dxnode.training.options import TrainOptions
    from dxnode.training.train import run_train

    require_train_extra()
    try:
        out = run_train(TrainOptions.from_args(args), settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dxnode train: {exc}", file=sys.stderr)
        return 2
    metrics = json.loads((out / "metrics.json").read_text())
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.training.evaluate import table

    print(table(metrics))
    warn_small_split(metrics, "train", "validation split")
    bundle = Path(out).resolve()
    print(f"wrote bundle {bundle} (serve it with [model] bundle = {json.dumps(str(bundle))})")
    return 0


def warn_small_split(metrics: dict[str, Any], command: str, what: str) -> None:
    """Warn on stderr about labels with too few positives or negatives for their metrics to mean anything."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.training.evaluate import small_split_warnings

    lines = small_split_warnings(metrics)
    if not lines:
        return
    print(f"dxnode {command}: warning: the {what} is too small for these metrics to mean much:", file=sys.stderr)
    shown = lines if len(lines) <= 6 else [*lines[:5], f"... and {len(lines) - 5} more labels like these"]
    for line in shown:
        print(f"  {line}", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate a bundle on a labelled CSV."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.extras import require_train_extra
    from dxnode.inference.bundle import BundleError
    from dxnode.training.evaluate import evaluate, table

    require_train_extra()
    try:
        metrics = evaluate(args.bundle, args.data, args.out, settings, args.images, args.split, args.seed, args.compare)
    except (ValueError, BundleError) as exc:
        print(f"dxnode evaluate: {exc}", file=sys.stderr)
        return 2
    print(table(metrics))
    warn_small_split(metrics, "evaluate", f"{args.split} split" if args.split else "data set")
    if args.compare:
        # start-up time: only this command loads it (`dxnode --help` stays quick)
        from dxnode.training.evaluate import compare_table

        print(compare_table(metrics))
    print(f"wrote {args.out}/metrics.json, metrics.csv, roc.png, calibration.png")
    return 0


def add_parsers(sub: Any) -> None:
    """predict, model (info, init-imagenet, export, quantize), train and evaluate."""
    sp = add_command(
        sub, "predict", cmd_predict, "run the model on DICOM, PNG or JPEG files (a folder: every such file in it)"
    )
    sp.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER")
    sp.add_argument("--model", metavar="BUNDLE", help="model bundle folder (default: [model] bundle)")
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument(
        "--heatmap-dir", metavar="DIR", help="write Grad-CAM overlay PNGs here (at most [report] sc_max_side a side)"
    )
    sp.add_argument("--top", type=int, default=3, help="findings shown per file")

    model = add_command(sub, "model", lambda a, s: 2, "model bundles")
    ms = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mi = ms.add_parser(
        "info", help="print a bundle's manifest and check its weights checksum", formatter_class=HelpFormatter
    )
    mi.add_argument("bundle", nargs="?", help="bundle folder (default: the configured model)")
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    mi.set_defaults(handler=cmd_model_info)
    mn = ms.add_parser(
        "init-imagenet", help="make a bundle from torchvision's resnet18-f37072fd.pth", formatter_class=HelpFormatter
    )
    mn.add_argument("path", help="bundle folder to create")
    mn.add_argument("--weights", help="the .pth file (default: [model] imagenet_weights or the torch hub cache)")
    mn.set_defaults(handler=cmd_model_init_imagenet)
    me = ms.add_parser(
        "export", help="add model.onnx (the ONNX Runtime engine's model) to a bundle", formatter_class=HelpFormatter
    )
    me.add_argument("bundle", help="bundle folder")
    me.set_defaults(handler=cmd_model_export)
    mq = ms.add_parser(
        "quantize",
        help="write an int8 copy of a bundle (ONNX Runtime static quantisation)",
        formatter_class=HelpFormatter,
    )
    mq.add_argument("bundle", help="fp32 bundle folder")
    mq.add_argument(
        "--calibration", required=True, metavar="CSV", help="labelled CSV whose images calibrate the int8 ranges"
    )
    mq.add_argument("--out", required=True, metavar="BUNDLE_INT8", help="new bundle folder to write")
    mq.add_argument("--images", help="image folder (default: the CSV's folder)")
    mq.add_argument(
        "--max-images", type=int, default=200, help="calibration images (frames) used at most (default 200)"
    )
    mq.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="calibration method (default minmax)",
    )
    mq.add_argument(
        "--reduce-range", action="store_true", help="7-bit weights, for x86 CPUs without VNNI (default off)"
    )
    mq.add_argument("--version", default="", help="version in the manifest (default: the source's version + '-int8')")
    mq.set_defaults(handler=cmd_model_quantize)

    add_command(sub, "train", cmd_train, "fine-tune ResNet-18 on labelled images and write a model bundle")
    add_command(sub, "evaluate", cmd_evaluate, "evaluate a model bundle on labelled images")
    from dxnode.training.train import add_evaluate_arguments, add_train_arguments  # kept beside their implementation

    add_train_arguments(sub.choices["train"])
    add_evaluate_arguments(sub.choices["evaluate"])

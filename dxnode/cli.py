"""The ``dxnode`` command: run the node, query the store, predict, train and evaluate models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from dxnode import __version__
from dxnode.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from dxnode.model import Classifier
    from dxnode.store import Store

log = logging.getLogger("dxnode")

Handler = Callable[[argparse.Namespace, Settings], int]


def _plain(value: Any) -> Any:
    """JSON-ready data: pydantic models (the read models of dxnode.queries) as the API serialises them."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Print one JSON document to stdout."""
    json.dump(_plain(value), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(items: Sequence[BaseModel] | Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print rows as a plain aligned text table."""
    rows: list[dict[str, Any]] = [_plain(r) for r in items]
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "") if r.get(c) is not None else "").ljust(widths[c]) for c in columns))


def open_store(settings: Settings, migrate: bool = True) -> Store:
    """Open the configured database as the daemon does (dxnode.store.open_store, imported when needed)."""
    from dxnode.store import open_store as open_node_store

    return open_node_store(settings, migrate)


# --- node --------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the node: SCP, worklist, job processes, dispatcher and web server."""
    from dxnode.daemon import serve

    return serve(settings, web=not args.no_web, log_level=args.log_level or settings.logging.level)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run only job processes and the outbox (scale-out beside a receiving node)."""
    from dxnode.daemon import work

    return work(settings, log_level=args.log_level or settings.logging.level)


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """Run only the REST API and web pages."""
    from dxnode.daemon import serve_web_only

    return serve_web_only(settings)


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    """C-ECHO a remote node."""
    from dxnode.scp import echo

    ok, message = echo(args.host, args.port, args.aet or settings.node.ae_title, args.aec, timeout=args.timeout)
    print(message)
    return 0 if ok else 1


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Apply the Alembic migrations."""
    from dxnode.store import Store, current_revision, upgrade

    upgrade(settings.database.url)
    print(f"database at revision {current_revision(Store(settings.database.url))}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    """Print the schema revision."""
    from dxnode.store import Store, current_revision

    print(current_revision(Store(settings.database.url)) or "empty (run `dxnode db upgrade`)")
    return 0


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective configuration (file + environment), secrets masked."""
    from dxnode.config import masked, to_toml

    data = masked(settings)
    if args.json:
        print_json(data)
    else:
        print(f"# effective configuration: {settings.source} + DXNODE_* environment; secrets masked")
        print(to_toml(data), end="")
    return 0


def cmd_config_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate a config file (and the environment); exit 2 naming the bad key."""
    checked = load_settings(args.path or args.config)  # ConfigError is reported by main()
    print(f"{checked.source}: ok")
    return 0


# --- queries -----------------------------------------------------------------------------------


def cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    """List received studies."""
    from dxnode.queries import StudyFilter, list_studies

    store = open_store(settings)
    with store.session() as session:
        rows = list_studies(session, StudyFilter(limit=args.limit))
    if args.json:
        print_json(rows)
    else:
        print_table(
            rows,
            [
                "study_instance_uid",
                "patient_id",
                "study_date",
                "modalities",
                "num_instances",
                "calling_aet",
                "last_received_at",
                "state",
            ],
        )
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """List jobs."""
    from dxnode.queries import JobFilter, list_jobs
    from dxnode.states import JobState

    store = open_store(settings)
    with store.session() as session:
        rows = list_jobs(session, JobFilter(state=JobState(args.state) if args.state else None, limit=args.limit))
    if args.json:
        print_json(rows)
    else:
        print_table(
            rows,
            [
                "id",
                "study_instance_uid",
                "state",
                "attempts",
                "routed_model",
                "model_name",
                "model_version",
                "created_at",
                "finished_at",
                "error",
            ],
        )
    return 0


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    """List study-level findings (the same query as GET /api/results)."""
    import datetime as dt
    import getpass

    from dxnode.queries import RESULT_COLUMNS, ResultFilter, list_results, results_csv
    from dxnode.store import audit

    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since).replace(tzinfo=dt.UTC)
        except ValueError:
            print(f"dxnode: --since {args.since!r} is not a date (YYYY-MM-DD)", file=sys.stderr)
            return 2
    if args.min_prob is not None and not 0 <= args.min_prob <= 1:
        print(f"dxnode: --min-prob {args.min_prob} is not a probability (0 to 1)", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("dxnode: --limit must be at least 1", file=sys.stderr)
        return 2
    store = open_store(settings)
    with store.session() as session:
        rows = list_results(
            session,
            ResultFilter(
                label=args.label,
                min_probability=args.min_prob,
                positive_only=args.positive,
                since=since,
                limit=args.limit,
            ),
        )
        audit(
            session, "cli", "cli.results.read", source="local", user=getpass.getuser(), rows=len(rows)
        )  # results carry patient IDs
    if args.json:
        print_json(rows)
    elif args.csv:
        sys.stdout.write(results_csv(rows))
    else:
        print_table(rows, [c for c in RESULT_COLUMNS if c not in ("accession_number", "model_demo", "threshold")])
    return 0


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    """List outbox deliveries."""
    from dxnode.queries import list_deliveries
    from dxnode.states import DeliveryState

    store = open_store(settings)
    with store.session() as session:
        rows = list_deliveries(session, state=DeliveryState(args.state) if args.state else None, limit=args.limit)
    if args.json:
        print_json(rows)
    else:
        print_table(
            rows,
            ["id", "kind", "label", "destination", "state", "attempts", "next_attempt_at", "sent_at", "last_error"],
        )
    return 0


def cmd_resend(args: argparse.Namespace, settings: Settings) -> int:
    """Re-queue deliveries of an output or a study."""
    from dxnode.dispatch import resend

    store = open_store(settings)
    with store.session() as session:
        n = resend(session, args.target, actor="cli")
    if not n:
        print(
            f"dxnode: no delivery for {args.target!r} (give an output SOP Instance UID, a Study Instance UID or a delivery id)",
            file=sys.stderr,
        )
        return 1
    print(f"re-queued {n} deliver{'y' if n == 1 else 'ies'}")
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    """Queue a study again (re-run its analysis)."""
    from dxnode.worklist import requeue_study

    store = open_store(settings)
    with store.session() as session:
        job_id = requeue_study(session, args.study, actor="cli")
    print(f"queued job {job_id}")
    return 0


def cmd_complete(args: argparse.Namespace, settings: Settings) -> int:
    """Force a study complete now instead of waiting for stable_seconds."""
    from dxnode.worklist import requeue_study

    store = open_store(settings)
    with store.session() as session:
        job_id = requeue_study(session, args.study, actor="cli", action="study.force_complete")
    print(f"queued job {job_id}")
    return 0


# --- models ------------------------------------------------------------------------------------


def load_model_or_say_why(settings: Settings, bundle: str | None) -> Classifier | None:
    """The configured (or given) model, or None after printing why it cannot be loaded."""
    from dxnode.model import BundleError, load_classifier

    try:
        return load_classifier(settings.model, bundle, settings.data_dir)
    except BundleError as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return None


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    """Run the model on files directly; exit 1 if any file failed, 2 if the model cannot load."""
    from dxnode.model import predict_file, save_png
    from dxnode.queries import PredictionOut

    classifier = load_model_or_say_why(settings, args.model)
    if classifier is None:
        return 2
    ident = classifier.identity
    results, failed = [], 0
    for name in args.files:
        pred = predict_file(Path(name), classifier, settings, top_k=args.top)
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
    info["device"] = str(classifier.device)
    info["weights_check"] = "built-in demo weights" if classifier.manifest.demo else "sha256 matches"
    info["engine"] = classifier.engine.name
    info["engine_reason"] = classifier.engine_reason
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
    from dxnode.engine import require_train_extra

    require_train_extra("init-imagenet")
    import torch

    from dxnode.model import imagenet_manifest, imagenet_weights_path, write_bundle

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
    from dxnode.engine import export_bundle

    export_bundle(Path(args.path))  # model.onnx for the ONNX Runtime engine
    print(
        f"wrote bundle {args.path}: {out.name} {out.version}, {len(out.labels)} labels, sha256 {out.weights_sha256[:16]}..."
    )
    return 0


def cmd_model_export(args: argparse.Namespace, settings: Settings) -> int:
    """Add model.onnx (checked against PyTorch, sha256 in the manifest) to a bundle."""
    from dxnode.engine import export_bundle
    from dxnode.model import BundleError

    try:
        m = export_bundle(Path(args.bundle))
    except (BundleError, RuntimeError) as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.bundle) / m.onnx_file} (sha256 {m.onnx_sha256[:16]}...)")
    return 0


def cmd_model_quantize(args: argparse.Namespace, settings: Settings) -> int:
    """Write an int8 copy of a bundle, calibrated on the images of a labelled CSV."""
    from dxnode.engine import quantize_bundle
    from dxnode.model import BundleError

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
    from dxnode.engine import require_train_extra
    from dxnode.train import run_train

    require_train_extra()
    try:
        out = run_train(args, settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dxnode train: {exc}", file=sys.stderr)
        return 2
    metrics = json.loads((out / "metrics.json").read_text())
    from dxnode.evaluate import table

    print(table(metrics))
    print(f'wrote bundle {out} (serve it with [model] bundle = "{out}")')
    return 0


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate a bundle on a labelled CSV."""
    from dxnode.engine import require_train_extra
    from dxnode.evaluate import evaluate, table
    from dxnode.model import BundleError

    require_train_extra()
    try:
        metrics = evaluate(args.bundle, args.data, args.out, settings, args.images, args.split, args.seed, args.compare)
    except (ValueError, BundleError) as exc:
        print(f"dxnode evaluate: {exc}", file=sys.stderr)
        return 2
    print(table(metrics))
    if args.compare:
        from dxnode.evaluate import compare_table

        print(compare_table(metrics))
    print(f"wrote {args.out}/metrics.json, metrics.csv, roc.png, calibration.png")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless it is empty or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from dxnode.states import DeliveryState, JobState

    p = argparse.ArgumentParser(
        prog="dxnode", description="dxnode: a DICOM AI node beside your PACS.", formatter_class=HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"dxnode {__version__}")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $DXNODE_CONFIG, else the bundled dxnode/resources/dxnode.toml)",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override [logging] level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        sp.set_defaults(handler=handler)
        return sp

    sp = add("serve", cmd_serve, "run the node: DICOM SCP, worklist, job processes, outbox and web server")
    sp.add_argument("--no-web", action="store_true", help="do not start the web server")
    add(
        "worker",
        cmd_worker,
        "run only job processes and the outbox, on the configured (shared PostgreSQL) database and data dir",
    )
    add("web", cmd_web, "run only the REST API and web pages")

    sp = add("echo", cmd_echo, "C-ECHO a DICOM node (verification)")
    sp.add_argument("host")
    sp.add_argument("port", type=int)
    sp.add_argument("--aec", default="ANY-SCP", help="called AE title")
    sp.add_argument("--aet", help="calling AE title (default: [node] ae_title)")
    sp.add_argument("--timeout", type=float, default=10, help="seconds")

    db = add("db", lambda a, s: (build_parser().parse_args(["db", "--help"]), 2)[1], "database schema")
    dbs = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbs.add_parser("upgrade", help="apply migrations").set_defaults(handler=cmd_db_upgrade)
    dbs.add_parser("current", help="print the schema revision").set_defaults(handler=cmd_db_current)

    cfg = add("config", lambda a, s: 2, "show or check the configuration")
    cfs = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cs = cfs.add_parser("show", help="print the effective configuration (file + environment), secrets masked")
    cs.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    cs.set_defaults(handler=cmd_config_show)
    cc = cfs.add_parser("check", help="validate a config file and the DXNODE_* environment; exit 2 naming the bad key")
    cc.add_argument(
        "path", nargs="?", metavar="PATH", help="config file (default: --config, $DXNODE_CONFIG or bundled)"
    )
    cc.set_defaults(handler=cmd_config_check, own_settings=True)

    sp = add("studies", cmd_studies, "list received studies")
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument("--limit", type=int, default=100, help="most rows printed")

    sp = add(
        "jobs", cmd_jobs, "list jobs (with the [[models]] entry each was routed to; --json adds the routing reasons)"
    )
    sp.add_argument("--state", choices=[str(s) for s in JobState], help="only jobs in this state")
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument("--limit", type=int, default=100, help="most rows printed")

    sp = add("requeue", cmd_requeue, "queue a study's analysis again (routing rules are applied anew)")
    sp.add_argument("study", help="Study Instance UID")
    sp = add("complete", cmd_complete, "force a study complete now (do not wait for stable_seconds)")
    sp.add_argument("study", help="Study Instance UID")

    sp = add("results", cmd_results, "list study-level findings")
    sp.add_argument("--label", help="only this label")
    sp.add_argument("--min-prob", type=float, help="only probabilities at or above this (0 to 1)")
    sp.add_argument("--positive", action="store_true", help="positive findings only")
    sp.add_argument("--since", help="date YYYY-MM-DD (UTC)")
    sp.add_argument("--limit", type=int, default=1000, help="most rows printed")
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON array")
    fmt.add_argument("--csv", action="store_true", help="print CSV (the columns of /api/results.csv)")

    sp = add("outbox", cmd_outbox, "list deliveries of results to destinations")
    sp.add_argument("--state", choices=[str(s) for s in DeliveryState], help="only deliveries in this state")
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument("--limit", type=int, default=100, help="most rows printed")
    sp = add("resend", cmd_resend, "re-queue delivery of an output (SOP Instance UID) or of a study's outputs")
    sp.add_argument("target", metavar="OUTPUT_OR_STUDY")

    sp = add("predict", cmd_predict, "run the model on DICOM, PNG or JPEG files")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--model", metavar="BUNDLE", help="model bundle folder (default: [model] bundle)")
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument(
        "--heatmap-dir", metavar="DIR", help="write Grad-CAM overlay PNGs here (at most [report] sc_max_side a side)"
    )
    sp.add_argument("--top", type=int, default=3, help="findings shown per file")

    model = add("model", lambda a, s: 2, "model bundles")
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

    sp = add("train", cmd_train, "fine-tune ResNet-18 on labelled images and write a model bundle")
    sp.set_defaults(parser_hook="train")
    sp = add("evaluate", cmd_evaluate, "evaluate a model bundle on labelled images")
    sp.set_defaults(parser_hook="evaluate")
    _add_training_arguments(sub)
    return p


def _add_training_arguments(sub: Any) -> None:
    """Arguments of train and evaluate (kept beside their implementation)."""
    from dxnode.train import add_evaluate_arguments, add_train_arguments

    add_train_arguments(sub.choices["train"])
    add_evaluate_arguments(sub.choices["evaluate"])


def setup_logging(level: str) -> None:
    """Log lines with time, level and stage name to stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in (
        "pynetdicom",
        "apscheduler",
        "uvicorn.access",
        "PIL",
        "matplotlib",
        "alembic",
        "highdicom",
        "multipart",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # While a job runs, APScheduler warns every poll that the runner is still busy: expected, not news.
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.ERROR, logging.getLevelName(level)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dxnode`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # `config check` reads the file it is given itself: a broken default must not stop it
        settings = Settings.model_construct() if getattr(args, "own_settings", False) else load_settings(args.config)
    except ConfigError as exc:
        print(f"dxnode: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.logging.level)
    try:
        return int(args.handler(args, settings))
    except ConfigError as exc:
        print(f"dxnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an admin gets one line and an exit status, not a traceback
        log.debug("traceback", exc_info=True)
        message = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
        print(f"dxnode {args.command}: {message or type(exc).__name__}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``dxnode`` command: run the node, query the store, predict, train and evaluate models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from dxnode import __version__
from dxnode.config import ConfigError, Settings, load_settings
from dxnode.logs import setup_logging

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
    """Open the configured database for a command that reads or edits it: a missing SQLite file is
    refused (DatabaseUnavailable naming its path), never created; only serve, worker and db upgrade create it."""
    from dxnode.store import open_store as open_node_store

    return open_node_store(settings, migrate, create=False)


def port_number(text: str) -> int:
    """argparse type: a TCP port from 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1-65535)")
    return value


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
    """Run only the REST API and web pages (on a database that serve or db upgrade made)."""
    from dxnode.daemon import serve_web_only

    open_store(settings, migrate=False).dispose()
    return serve_web_only(settings)


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    """C-ECHO a remote node."""
    from dxnode.scp import echo

    ok, message = echo(args.host, args.port, args.aet or settings.node.ae_title, args.aec, timeout=args.timeout)
    if not ok:
        hint = "; give its AE title with --aec" if "called AE title not recognised" in message else ""
        print(f"dxnode echo: {message}{hint}", file=sys.stderr)
        return 1
    print(message)
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Apply the Alembic migrations."""
    from dxnode.store import current_revision
    from dxnode.store import open_store as open_node_store

    store = open_node_store(settings, migrate=True, create=True)
    print(f"database at revision {current_revision(store)}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    """Print the schema revision."""
    from dxnode.store import current_revision

    print(current_revision(open_store(settings, migrate=False)) or "empty (run `dxnode db upgrade`)")
    return 0


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective configuration (file + environment), secrets masked."""
    from dxnode.config import SECRET, has_secrets, masked, to_toml

    data = masked(settings)
    if args.json:
        print_json(data)
    else:
        print(f"# effective configuration: {settings.source} + DXNODE_* environment")
        if has_secrets(data):
            print(f"# secrets are shown as {SECRET} (tokens, session secret) or *** (database password):")
            print("# this output is refused as a configuration until the real values are put back")
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
    """List outbox deliveries, each with the address its destination has in this configuration."""
    from dxnode.queries import list_deliveries
    from dxnode.states import DeliveryState

    if args.limit < 1:
        print("dxnode outbox: --limit must be at least 1", file=sys.stderr)
        return 2
    store = open_store(settings)
    with store.session() as session:
        rows = list_deliveries(
            session,
            state=DeliveryState(args.state) if args.state else None,
            destination=args.destination,
            limit=args.limit,
            study_instance_uid=args.study,
            destinations=settings.destinations,
        )
    if args.json:
        print_json(rows)
    else:
        shown = [r.model_dump() | {"address": r.address or "(not configured)"} for r in rows]
        print_table(
            shown,
            [
                "id",
                "kind",
                "label",
                "destination",
                "address",
                "state",
                "attempts",
                "next_attempt_at",
                "sent_at",
                "last_error",
            ],
        )
    return 0


def _outbox_selection(args: argparse.Namespace) -> Any:
    """The dispatch.Selection of `outbox cancel|retry`, or None after saying that one is needed."""
    from dxnode.dispatch import Selection

    sel = Selection(tuple(args.delivery or ()), args.study or "", args.destination or "")
    if sel.empty:
        print(
            f"dxnode outbox {args.outbox_command}: give --delivery ID, --study UID or --destination NAME",
            file=sys.stderr,
        )
        return None
    return sel


def _outbox_change(args: argparse.Namespace, settings: Settings, done: str) -> int:
    """Run `outbox cancel` or `outbox retry` and report it; exit 1 if nothing matched or changed."""
    import getpass

    from dxnode import dispatch

    sel = _outbox_selection(args)
    if sel is None:
        return 2
    store = open_store(settings)
    with store.session() as session:
        if args.outbox_command == "cancel":
            change = dispatch.cancel(session, sel, actor="cli", source="local", user=getpass.getuser())
        else:
            change = dispatch.retry(session, sel, settings, actor="cli", source="local", user=getpass.getuser())
    if args.json:
        print_json(change)
    elif change.matched:
        n = len(change.changed)
        print(f"{done} {n} deliver{'y' if n == 1 else 'ies'}" + (f" ({_ids(change.changed)})" if n else ""))
        for reason, ids in change.skipped.items():
            print(f"left {len(ids)} as they were, {reason} ({_ids(ids)})")
    if not change.matched:
        print(f"dxnode outbox {args.outbox_command}: no delivery matches {change.selection}", file=sys.stderr)
        return 1
    # Success: something changed, or every row was cancelled already (cancel twice is no error).
    return 0 if change.changed or set(change.skipped) <= {"already cancelled"} else 1


def _ids(ids: list[int], most: int = 20) -> str:
    """'ids 1, 2, 3' (the first 20, then how many more)."""
    text = ", ".join(map(str, ids[:most]))
    return f"id{'s' if len(ids) > 1 else ''} {text}" + (f" and {len(ids) - most} more" if len(ids) > most else "")


def cmd_outbox_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Cancel unsent deliveries: they are never sent (audited)."""
    return _outbox_change(args, settings, "cancelled")


def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Send unsent deliveries at once, to their destination as configured now (audited)."""
    return _outbox_change(args, settings, "re-queued")


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
    from dxnode.bundle import BundleError
    from dxnode.model import load_classifier

    try:
        return load_classifier(settings.model, bundle, settings.data_dir)
    except BundleError as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return None


def file_kind(path: Path) -> str | None:
    """'dicom' (DICM at byte 128, what the reader needs), 'image' (PNG or JPEG) or None."""
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
    from dxnode.predict import FilePrediction, predict_file, save_png
    from dxnode.queries import PredictionOut

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
        from dxnode.intended import NO_DECLARATION

        info["intended_use"] = NO_DECLARATION
    elif not args.json:
        info["intended_use"] = classifier.manifest.intended_use.describe()
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
    from dxnode.extras import require_train_extra

    require_train_extra("init-imagenet")
    import torch

    from dxnode.bundle import imagenet_manifest, imagenet_weights_path, write_bundle

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
    from dxnode.bundle import BundleError
    from dxnode.engine import export_bundle

    try:
        m = export_bundle(Path(args.bundle))
    except (BundleError, RuntimeError) as exc:
        print(f"dxnode: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.bundle) / m.onnx_file} (sha256 {m.onnx_sha256[:16]}...)")
    return 0


def cmd_model_quantize(args: argparse.Namespace, settings: Settings) -> int:
    """Write an int8 copy of a bundle, calibrated on the images of a labelled CSV."""
    from dxnode.bundle import BundleError
    from dxnode.quantize import quantize_bundle

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
    from dxnode.extras import require_train_extra
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
    warn_small_split(metrics, "train", "validation split")
    bundle = Path(out).resolve()
    print(f"wrote bundle {bundle} (serve it with [model] bundle = {json.dumps(str(bundle))})")
    return 0


def warn_small_split(metrics: dict[str, Any], command: str, what: str) -> None:
    """Warn on stderr about labels with too few positives or negatives for their metrics to mean anything."""
    from dxnode.evaluate import small_split_warnings

    lines = small_split_warnings(metrics)
    if not lines:
        return
    print(f"dxnode {command}: warning: the {what} is too small for these metrics to mean much:", file=sys.stderr)
    shown = lines if len(lines) <= 6 else [*lines[:5], f"... and {len(lines) - 5} more labels like these"]
    for line in shown:
        print(f"  {line}", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate a bundle on a labelled CSV."""
    from dxnode.bundle import BundleError
    from dxnode.evaluate import evaluate, table
    from dxnode.extras import require_train_extra

    require_train_extra()
    try:
        metrics = evaluate(args.bundle, args.data, args.out, settings, args.images, args.split, args.seed, args.compare)
    except (ValueError, BundleError) as exc:
        print(f"dxnode evaluate: {exc}", file=sys.stderr)
        return 2
    print(table(metrics))
    warn_small_split(metrics, "evaluate", f"{args.split} split" if args.split else "data set")
    if args.compare:
        from dxnode.evaluate import compare_table

        print(compare_table(metrics))
    print(f"wrote {args.out}/metrics.json, metrics.csv, roc.png, calibration.png")
    return 0


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> Any:  # argparse's own signature returns NoReturn
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`\n")


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

    p = Parser(prog="dxnode", description="dxnode: a DICOM AI node beside your PACS.", formatter_class=HelpFormatter)
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
    sp.add_argument("port", type=port_number, help="TCP port (1-65535)")
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

    sp = add(
        "outbox",
        cmd_outbox,
        "list deliveries of results to destinations (with the address each goes to now); cancel or retry some",
    )
    sp.add_argument("--state", choices=[str(s) for s in DeliveryState], help="only deliveries in this state")
    sp.add_argument("--destination", metavar="NAME", help="only deliveries to this [[destinations]] name")
    sp.add_argument("--study", metavar="UID", help="only deliveries of this Study Instance UID")
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument("--limit", type=int, default=100, help="most rows printed")
    obs = sp.add_subparsers(dest="outbox_command", metavar="[ACTION]")
    for name, handler, text in (
        ("cancel", cmd_outbox_cancel, "cancel unsent deliveries (pending, failed, orphaned): never sent; audited"),
        (
            "retry",
            cmd_outbox_retry,
            "send unsent deliveries (pending, failed, cancelled, orphaned) at once, to the address configured now; "
            "audited",
        ),
    ):
        op = obs.add_parser(name, help=text, description=text + ". Rows must match every option given.")
        op.add_argument("--delivery", type=int, action="append", metavar="ID", help="a delivery id (repeatable)")
        op.add_argument("--study", metavar="UID", help="the deliveries of this Study Instance UID")
        op.add_argument("--destination", metavar="NAME", help="the deliveries to this [[destinations]] name")
        op.add_argument("--json", action="store_true", help="print what changed as one JSON object")
        op.set_defaults(handler=handler)
    sp = add("resend", cmd_resend, "re-queue delivery of an output (SOP Instance UID) or of a study's outputs")
    sp.add_argument("target", metavar="OUTPUT_OR_STUDY")

    sp = add("predict", cmd_predict, "run the model on DICOM, PNG or JPEG files (a folder: every such file in it)")
    sp.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER")
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


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `seq 100000 | head` reports for seq


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dxnode`` console script.

    Exit status: 0 ok, 1 failure (one line on stderr), 2 usage or configuration error, 130 on
    Ctrl-C, 141 when the reader of stdout went away (``dxnode outbox | head``), quietly.
    """
    try:
        return _run(argv)
    except BrokenPipeError:
        # Nothing more can be written to the pipe; point stdout at /dev/null so that the
        # interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    """Parse, load the configuration and run the command; every error becomes one line and a status."""
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
        status = int(args.handler(args, settings))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except ConfigError as exc:
        print(f"dxnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # an admin gets one line and an exit status, not a traceback
        log.debug("traceback", exc_info=True)
        message = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
        actions = (getattr(args, f"{args.command}_command", None),)  # db current, model info, ...
        command = " ".join([args.command, *(a for a in actions if a)])
        print(f"dxnode {command}: {message or type(exc).__name__}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Node configuration: a TOML file, overridden by DXNODE_<SECTION>__<KEY> environment variables.

The file is chosen by ``dxnode --config PATH``, else ``DXNODE_CONFIG``, else the bundled
``dxnode/resources/dxnode.toml`` inside the package. Relative paths
(``data_dir``, a relative SQLite URL, model bundle paths) are resolved against the *working
directory* the node is started from, the same rule SQLAlchemy applies to ``sqlite:///relative``.
Every key is validated at start; an unknown key or a bad value is an error naming the key.
"""

from __future__ import annotations

import difflib
import importlib.resources
import ipaddress
import json
import os
import re
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dxnode.states import HeatmapFor, OutputKind, Priority
from dxnode.uids import is_valid_ae_title


class ConfigError(Exception):
    """The configuration file or an override is invalid; the message names the key."""


HIDDEN_PASSWORD = "***"  # how SQLAlchemy masks a database password (config show prints it)


def _check_ae_title(value: str) -> str:
    """Return the AE title if it is 1-16 printable ASCII characters without a backslash."""
    if not is_valid_ae_title(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return value.strip()


def _unique(section: str, what: str, values: list[str]) -> None:
    """Raise the one-line error for a [[section]] list whose names (or AE titles) repeat."""
    if len(set(values)) != len(values):
        raise ValueError(f"[[{section}]] {what} must be unique: {values}")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# The caption of a heatmap SC needs an image at least this wide.
MIN_SC_SIDE = 512


def _check_sc_max_side(value: int | None) -> int | None:
    """sc_max_side: 0 (source size) or at least MIN_SC_SIDE pixels."""
    if value is not None and value != 0 and value < MIN_SC_SIDE:
        raise ValueError(f"must be 0 (source size) or at least {MIN_SC_SIDE} (the caption's width), not {value}")
    return value


class NodeSettings(Section):
    """[node]: the DICOM identity of this node and where it keeps received files."""

    ae_title: str = "DXNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    data_dir: Path = Path("var")
    allowed_calling_aets: list[str] = []
    # False: an association calling another AE title than ae_title is rejected ("called AE title not recognised").
    accept_any_called_ae: bool = False
    max_associations: int = Field(10, ge=1)
    # Refuse C-STORE (0xA700) while the data dir's file system has less free space than this.
    min_free_mb: int = Field(1024, ge=0)
    # Refuse (0xA700) a C-STORE whose dataset is, or inflates (Deflated syntax) to, more than this.
    max_instance_mb: float = Field(512, gt=0)
    acse_timeout: float = Field(30, gt=0)
    dimse_timeout: float = Field(60, gt=0)
    network_timeout: float = Field(120, gt=0)
    # Optional DICOM TLS listener beside the plain one.
    tls_port: int | None = Field(None, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    # SIGTERM: stop listening and claiming, re-queue unfinished jobs, and exit within this many seconds.
    stop_timeout_seconds: float = Field(20, gt=0)
    # Received datasets (C-STORE and STOW-RS together) held and handled at once in serve; past this 0xA700.
    max_inflight_mb: float = Field(1024, gt=0)
    # Processes that receive DICOM on the same port, committing through one more (dxnode/receivers.py):
    # more instances a second from several concurrent senders. 1: serve alone, as before.
    receive_processes: int = Field(1, ge=1, le=16)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class DatabaseSettings(Section):
    """[database]: SQLAlchemy URL; SQLite (WAL) by default, postgresql+psycopg:// for several nodes."""

    url: str = "sqlite:///var/dxnode.db"
    busy_timeout_s: float = Field(30, gt=0)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:

        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError(
                "not a database URL (sqlite:///path or postgresql+psycopg://user:password@host/db)"
            ) from None
        if url.password == HIDDEN_PASSWORD:
            raise ValueError("has the password mask `dxnode config show` prints (***); put the real password")
        return v


class WorklistSettings(Section):
    """[worklist]: when a study counts as complete, and how jobs are run."""

    stable_seconds: float = Field(10, ge=0)
    # Per calling AE title overrides of stable_seconds (DICOM has no end-of-study signal).
    stable_seconds_by_aet: dict[str, float] = {}
    sweep_interval_seconds: float = Field(2, gt=0)
    poll_interval_seconds: float = Field(1, gt=0)
    max_attempts: int = Field(3, ge=1)
    # A running job whose heartbeat (refreshed between stages and batches) is older than this is re-queued.
    running_timeout_seconds: float = Field(300, gt=0)
    run_jobs: bool = True
    workers: int = Field(1, ge=1)  # job processes, each loading the model once
    worker_max_rss_mb: int = Field(0, ge=0)  # a job process above this resident size is stopped (0 = no limit)
    # Delay before a failed attempt (transient error, lost worker) is retried: doubled per attempt, capped.
    retry_backoff_seconds: float = Field(10, ge=0)
    retry_backoff_max_seconds: float = Field(600, ge=0)
    # Priority rules for pushed studies (a fetch request or an order sets its own): by calling AE
    # title, and by the Requested Procedure Priority (0040,1003) in the images; the most urgent wins.
    priority_by_aet: dict[str, Priority] = {}
    priority_from_dataset: bool = True
    fetch_interval_seconds: float = Field(2, gt=0)  # how often each source's fetcher looks for requests


class Destination(Section):
    """[[destinations]]: a DICOM node (usually the PACS) that receives the SR and SC, by C-STORE or STOW-RS."""

    name: str
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = ""  # dimse (also names the sender for return_to_sender)
    host: str = ""  # dimse
    port: int = Field(0, ge=0, le=65535)  # dimse
    # DICOM TLS: verify the destination against [node] tls_ca (else the system CAs) and present
    # [node] tls_cert/tls_key as the client certificate when they are set.
    tls: bool = False
    # Only the results of studies this AE title sent (with [dispatch] return_to_sender), not every result.
    return_only: bool = False
    # dicomweb: the STOW-RS service base (objects are POSTed to <url>/studies); https is verified
    # against the system CAs plus ca_file. The secret is read from the environment variable named
    # by secret_env at send time and never logged: a password (basic, with username) or a token (bearer).
    url: str = ""
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    secret_env: str = ""
    ca_file: Path | None = None
    # Which result objects this destination gets (dxnode/outputs/report.py writes the kinds some destination wants).
    outputs: list[OutputKind] = Field(default_factory=lambda: [OutputKind.SR, OutputKind.SC], min_length=1)
    # Storage Commitment (Push Model, dimse only): after the outputs are stored, ask the destination
    # to commit them (N-ACTION); a delivery is "committed" once its report says so. No report within
    # commitment_timeout seconds: an alert (log, metric) and a new request.
    commitment: bool = False
    commitment_timeout: float = Field(600, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v) if v else v

    @field_validator("port")
    @classmethod
    def _port(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("kind", "dimse") == "dimse" and v < 1:
            raise ValueError("a dimse destination needs a port from 1 to 65535")
        return v

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "dimse" and (not self.ae_title or not self.host or not self.port):
            raise ValueError(f"destination {self.name!r}: a dimse destination needs ae_title, host and port")
        if self.kind == "dicomweb":
            url = urlsplit(self.url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"destination {self.name!r}: url must be an http(s) URL, got {self.url!r}")
            if url.username or url.password:
                raise ValueError(f"destination {self.name!r}: no credentials in url; use auth and secret_env")
            loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
            if self.auth != "none" and url.scheme == "http" and not loopback:
                raise ValueError(f"destination {self.name!r}: auth over plain http; use an https url")
            if self.auth != "none" and not self.secret_env:
                raise ValueError(f"destination {self.name!r}: auth = {self.auth!r} needs secret_env")
            if self.auth == "basic" and not self.username:
                raise ValueError(f"destination {self.name!r}: auth = 'basic' needs username")
        if self.commitment and self.kind != "dimse":
            raise ValueError(f"destination {self.name!r}: commitment (Storage Commitment) needs a dimse destination")
        return self


class WindowPreset(Section):
    """A VOI window chosen by modality and (optionally) body part, before the dataset's own."""

    modality: str
    body_part: str = ""
    center: float
    width: float = Field(gt=0)


class DeprecatedKeyWarning(FutureWarning):
    """A config key was given by its old name (shown by default: it is meant for the admin)."""


# Keys renamed, by section: old name -> new name. The old name still works, with a warning.
RENAMED_KEYS: dict[str, dict[str, str]] = {
    # [model] decode_threads (the prefetch threads) kept its name; this one is the JPEG 2000 decoder's.
    "pipeline": {"decode_threads": "j2k_threads"},
}


def _accept_renamed(data: Any, section: str, renamed: dict[str, str]) -> Any:
    """data with each old key moved to its new name, warning once per old key; both given is an error."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"{old} is the old name of {new}: set {new} only")
        warnings.warn(f"[{section}] {old} is deprecated: rename it to {new}", DeprecatedKeyWarning, stacklevel=2)
        data[new] = data.pop(old)
    return data


class PipelineSettings(Section):
    """[pipeline]: which instances go to the model and how pixels become model input.

    The filters are the admin's choice, used as written; one left empty (or 0) takes what the
    model's bundle declares it is for (its manifest's intended_use, dxnode.inference.intended), and a
    bundle that declares nothing takes any image.
    """

    modalities: list[str] = []  # empty = the bundle's declared modalities (none declared: any)
    sop_classes: list[str] = []  # empty = the bundle's declared SOP classes (none declared: any image class)
    body_parts: list[str] = []  # empty = the bundle's declared body parts (none declared: any)
    photometric: list[str] = []  # Photometric Interpretation values; empty = the bundle's declared ones
    min_rows: int = Field(0, ge=0)  # smaller images are skipped; 0 = the bundle's declared minimum
    min_columns: int = Field(0, ge=0)
    max_frames: int = Field(8, ge=1)
    # Refuse an instance whose declared decoded pixels (rows x columns x frames decoded x samples x
    # bytes) exceed this, before any decoder runs; also bounds what a Deflated file may inflate to.
    max_decoded_mb: float = Field(256, gt=0)
    windows: list[WindowPreset] = []
    # JPEG 2000 decoded at the reduced level whose longest side is at most this (0 = always full size)
    decode_max_side: int = Field(1024, ge=0)
    j2k_threads: int = Field(0, ge=0)  # JPEG 2000 decoder threads (0 = every core, at most 4)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Accept the keys' old names, with a warning (the old name is not accepted with the new one)."""
        return _accept_renamed(data, "pipeline", RENAMED_KEYS["pipeline"])


class ModelSettings(Section):
    """[model]: the ResNet-18 bundle served by this node."""

    bundle: str = ""  # empty: ImageNet bundle if the torchvision file is present, else the untrained demo
    imagenet_weights: str = ""  # path of resnet18-f37072fd.pth; empty: look in $TORCH_HOME/hub/checkpoints
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: ONNX Runtime on CPU (when the model has an ONNX export), PyTorch on CUDA unless onnxruntime-gpu works
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    threads: int = Field(0, ge=0)  # CPU threads of torch and ONNX Runtime; 0 = their default
    batch_size: int = Field(8, ge=1)
    decode_threads: int = Field(2, ge=1)  # threads decoding the next instances while the model runs a batch
    aggregate: Literal["max", "mean"] = "max"


class ModelEntry(Section):
    """[[models]]: one of several models, with the rules that route series of a study to it.

    Every rule that is set must hold for a series (empty strings match anything); a study gets
    one job per entry that at least one of its series matches, and that job analyses the matching
    series only. Without [[models]] the [model] section is the only model. modalities, body_parts
    and sop_classes left empty (here and in [pipeline]) take what the entry's bundle declares.
    """

    name: str = Field("", max_length=64)
    bundle: str = ""  # a bundle folder, "demo" or "imagenet"; empty: as [model] bundle
    engine: Literal["", "auto", "torch", "onnxruntime"] = ""  # empty: as [model] engine
    heatmap_for: HeatmapFor | None = None  # None: as [report]
    sc_max_side: int | None = Field(None, ge=0)  # None: as [report]
    modalities: list[str] = []
    body_parts: list[str] = []
    sop_classes: list[str] = []
    series_description: str = ""  # regular expression, searched case-insensitively
    study_description: str = ""  # regular expression, searched case-insensitively
    calling_aets: list[str] = []
    min_instances: int | None = Field(None, ge=0)  # per series
    max_instances: int | None = Field(None, ge=0)
    # Series of this model's SR and SC; None: [report] numbers + 10 x the entry's position.
    sr_series_number: int | None = None
    sc_series_number: int | None = None
    sr_series_description: str = ""  # empty: "[report] sr_series_description (name)"
    sc_series_description: str = ""

    _sc_max_side = field_validator("sc_max_side")(lambda cls, v: _check_sc_max_side(v))

    @field_validator("series_description", "study_description")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v


class ReportSettings(Section):
    """[report]: the SR and the Grad-CAM Secondary Capture sent back to the PACS."""

    sr_series_description: str = "AI Results"
    sr_series_number: int = 9901
    sc_series_description: str = "AI Heatmaps"
    sc_series_number: int = 9902
    heatmap_for: HeatmapFor = HeatmapFor.POSITIVE
    # Longest side (Rows or Columns) of a heatmap SC, caption included; the heatmap is drawn on a
    # display image at most this large, downsampled from the source. 0 = the source's size.
    sc_max_side: int = Field(1024, ge=0)
    # A TID 1410 planar ROI per positive finding: the Grad-CAM region >= half its peak on the source image.
    attention_roi: bool = True
    manufacturer: str = "dxnode"
    institution_name: str = ""
    # The SEG output kind: "binary" (the attention regions, the one most viewers show) or
    # "fractional" (the Grad-CAM map itself, 0..1, on the frames holding a region).
    seg_type: Literal["binary", "fractional"] = "binary"

    _sc_max_side = field_validator("sc_max_side")(lambda cls, v: _check_sc_max_side(v))


class DispatchSettings(Section):
    """[dispatch]: the outbox that sends results to the destinations."""

    # Also send results to the sender of the study: the [[destinations]] entry whose ae_title is
    # the study's calling AE title (a calling AE's address and port are never taken from the network).
    # Entries with return_only = true get only these; the others get every result.
    return_to_sender: bool = False
    interval_seconds: float = Field(2, gt=0)
    max_attempts: int = Field(20, ge=1)
    backoff_initial_seconds: float = Field(5, gt=0)
    backoff_max_seconds: float = Field(900, gt=0)
    timeout_seconds: float = Field(30, gt=0)


# What `config show` prints in place of a secret; refused as a value, so its output never loads as if real.
SECRET = "********"
MIN_TOKEN_LENGTH = 20


def _not_the_mask(value: str, what: str) -> str:
    if value == SECRET:
        raise ValueError(f"is the mask `dxnode config show` prints; put the real {what}")
    return value


class WebToken(Section):
    """[[web.tokens]]: a bearer token and its role."""

    name: str
    token: str
    # store: STOW-RS only (a PACS sending studies); request: read, and fetch requests (POST /api/requests)
    role: Literal["admin", "read", "store", "request"] = "read"

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        _not_the_mask(v, "token")
        if len(v) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"has {len(v)} character{'' if len(v) == 1 else 's'}; a token needs at least {MIN_TOKEN_LENGTH} "
                "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return v


class WebSettings(Section):
    """[web]: REST API, dashboard and upload page."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tokens: list[WebToken] = []
    session_secret: str = ""  # empty: a random secret per process (sessions end on restart)
    max_upload_mb: float = Field(64, gt=0)
    # STOW-RS (POST /dicomweb/studies): larger bodies get 413 (the body is spooled to disk); larger parts fail alone.
    stow_max_body_mb: float = Field(512, gt=0)
    stow_max_part_mb: float = Field(256, gt=0)
    keep_uploads: bool = False
    session_hours: float = Field(12, gt=0)  # a login lasts this long; logging out ends it at once
    trusted_origins: list[str] = []  # extra origins for cookie POSTs, e.g. behind a proxy that rewrites Host
    login_free_attempts: int = Field(10, ge=1)  # failed token guesses per client address per hour before delays
    login_delay_s: float = Field(1, gt=0)  # the first delay after those; it doubles with each further failure
    login_max_delay_s: float = Field(900, gt=0)
    # Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed.
    trusted_proxies: list[str] = []

    _secret = field_validator("session_secret")(lambda cls, v: _not_the_mask(v, "session secret"))

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, values: list[str]) -> list[str]:
        proxies = []
        for v in values:
            try:
                proxies.append(
                    str(ipaddress.ip_network(v.strip(), strict=False) if "/" in v else ipaddress.ip_address(v.strip()))
                )
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return proxies


class LoggingSettings(Section):
    """[logging]: log level of the daemon."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Source(Section):
    """[[sources]]: a PACS the node fetches studies from: C-FIND, then C-MOVE to this node or C-GET
    (dimse), or QIDO-RS then WADO-RS (dicomweb, auth as for destinations)."""

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = ""  # dimse
    host: str = ""  # dimse
    port: int = Field(0, ge=0, le=65535)  # dimse
    tls: bool = False  # dimse: DICOM TLS as for destinations
    retrieve: Literal["move", "get"] = "move"  # dimse: C-MOVE to move_destination, or C-GET
    move_destination: str = ""  # the AE title the source knows this node by (empty: [node] ae_title)
    url: str = ""  # dicomweb: the QIDO-RS/WADO-RS service base
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    secret_env: str = ""
    ca_file: Path | None = None
    max_instances: int = Field(5000, ge=1)  # a retrieve of more instances is refused, with the reason
    max_mb: float = Field(4096, gt=0)  # a retrieve past this many MB is stopped and refused
    timeout_seconds: float = Field(60, gt=0)  # association, DIMSE and HTTP timeout
    max_attempts: int = Field(5, ge=1)  # a failing request is retried this many times, then failed
    retry_backoff_seconds: float = Field(30, ge=0)  # doubled per attempt
    retry_backoff_max_seconds: float = Field(900, ge=0)

    @field_validator("ae_title", "move_destination")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v) if v else v

    @model_validator(mode="after")
    def _complete(self) -> Source:
        if self.kind == "dimse" and (not self.ae_title or not self.host or not self.port):
            raise ValueError(f"source {self.name!r}: a dimse source needs ae_title, host and port")
        if self.kind == "dicomweb":
            as_destination = {k: getattr(self, k) for k in ("url", "auth", "username", "secret_env", "ca_file")}
            try:
                Destination(name=self.name, kind="dicomweb", **as_destination)
            except ValidationError as exc:
                raise ValueError(
                    str(exc.errors()[0]["msg"]).removeprefix("Value error, ").replace("destination", "source")
                ) from None
        return self


# HL7 versions whose ORM^O01 and OMI^O23 the listener reads (MSH-12); others get AR (HL7 error 203).
HL7_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9")


class Hl7Rule(Section):
    """[[hl7.rules]]: an order whose procedure code (OBR-4) or modality (IPC-5, OBR-24) is listed triggers a
    fetch by accession number from the [[sources]] entry named source."""

    name: str = ""
    procedure_codes: list[str] = []  # OBR-4.1 (Universal Service Identifier) values
    modalities: list[str] = []  # IPC-5 (OMI^O23) or OBR-24 (Diagnostic Service Section) values
    source: str = Field(min_length=1, max_length=64)
    priority: Literal["", "stat", "high", "medium", "low"] = ""  # "": the order's own (ORC-7.6 / TQ1-9), else medium
    wait_minutes: float | None = Field(None, gt=0)  # None: [hl7] wait_minutes

    @model_validator(mode="after")
    def _matches_something(self) -> Hl7Rule:
        if not self.procedure_codes and not self.modalities:
            raise ValueError(f"rule {self.name or self.source!r}: give procedure_codes or modalities (or both)")
        return self


class Hl7Destination(Section):
    """[[hl7.destinations]]: where results go as an ORU^R01 over MLLP, or as a FHIR DiagnosticReport."""

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["mllp", "fhir"] = "mllp"
    host: str = ""  # mllp
    port: int = Field(0, ge=0, le=65535)  # mllp
    receiving_application: str = ""  # mllp: MSH-5
    receiving_facility: str = ""  # mllp: MSH-6
    # fhir: the base URL the transaction Bundle is POSTed to; the bearer token is read from the
    # environment variable named by secret_env at send time and never logged.
    url: str = ""
    secret_env: str = ""
    # ordered: results of studies an HL7 order asked for (same accession number); all: every result.
    studies: Literal["ordered", "all"] = "ordered"

    @model_validator(mode="after")
    def _complete(self) -> Hl7Destination:
        if self.kind == "mllp" and (not self.host or not self.port):
            raise ValueError(f"hl7 destination {self.name!r}: an mllp destination needs host and port")
        if self.kind == "fhir":
            url = urlsplit(self.url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"hl7 destination {self.name!r}: url must be an http(s) URL, got {self.url!r}")
            loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
            if self.secret_env and url.scheme == "http" and not loopback:
                raise ValueError(f"hl7 destination {self.name!r}: a token over plain http; use an https url")
        return self


class Hl7Settings(Section):
    """[hl7]: HL7 v2 orders in over MLLP (ORM^O01, OMI^O23), results out (ORU^R01, FHIR)."""

    enabled: bool = False  # run the MLLP listener in `dxnode serve`
    host: str = "0.0.0.0"
    port: int = Field(2575, ge=0, le=65535)
    sending_application: str = "DXNODE"  # MSH-3 of the node's ACKs and ORUs
    sending_facility: str = ""  # MSH-4
    allowed_sending_applications: list[str] = []  # MSH-3.1 values; empty = any
    allowed_sending_facilities: list[str] = []  # MSH-4.1 values; empty = any
    max_message_kb: int = Field(1024, ge=1)  # a larger message gets AR, and the next one is read
    max_field_chars: int = Field(16384, ge=64)  # a message with a longer field gets AE
    max_connections: int = Field(10, ge=1)
    idle_timeout_seconds: float = Field(300, gt=0)  # a connection silent this long is closed
    wait_minutes: float = Field(60, gt=0)  # how long the fetch stage polls the source for an ordered study
    rules: list[Hl7Rule] = []
    destinations: list[Hl7Destination] = []

    @field_validator("destinations")
    @classmethod
    def _names(cls, values: list[Hl7Destination]) -> list[Hl7Destination]:
        _unique("hl7.destinations", "names", [d.name for d in values])
        return values


class RetentionSettings(Section):
    """[retention]: when received pixel data and results are removed (docs/operations.md). Off by default."""

    keep_days: float = Field(0, ge=0)  # purge a finished study's received instances this long after; 0 = keep
    max_storage_mb: int = Field(0, ge=0)  # quota on received instances, oldest finished studies first; 0 = none
    high_water_percent: float = Field(90, gt=0, le=100)  # of the quota: a purge starts above this ...
    low_water_percent: float = Field(80, gt=0, le=100)  # ... and frees finished studies down to this
    free_headroom_mb: int = Field(1024, ge=0)  # with a quota: purge when free disk < [node] min_free_mb + this
    results_keep_days: float = Field(0, ge=0)  # findings, outputs, audit kept this long after; 0 = forever
    interval_seconds: float = Field(600, gt=0)  # how often serve purges by age (keep_days, results_keep_days)
    quota_check_seconds: float = Field(10, gt=0)  # how often serve checks the quota and the free space
    reconcile_at_start: bool = True  # serve finishes interrupted purges and looks for files and rows apart

    @model_validator(mode="after")
    def _water_marks(self) -> RetentionSettings:
        if self.low_water_percent > self.high_water_percent:
            raise ValueError("low_water_percent must not be above high_water_percent")
        return self


class UpsEntry(Section):
    """[[ups]]: a Task Manager's UPS service the node performs AI tasks for (IHE AIW-I): it subscribes
    to its events, polls it for SCHEDULED workitems that match, claims them, and reports back."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str = Field(min_length=1)  # the Task Manager's UPS SCP
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = False  # DICOM TLS as for destinations
    source: str = Field(min_length=1, max_length=64)  # [[sources]] name for inputs that name no known AE
    workitem_codes: list[str] = []  # Scheduled Workitem Code Sequence code values to take; empty = any
    station_names: list[str] = []  # Scheduled Station Name Code Sequence code values; empty = any
    poll_seconds: float = Field(30, gt=0)  # C-FIND for SCHEDULED workitems, and a look at the claimed ones
    subscribe: bool = True  # N-ACTION subscribe (global), events to the node's own DICOM listener
    timeout_seconds: float = Field(30, gt=0)  # association and DIMSE timeout
    retry_backoff_max_seconds: float = Field(300, gt=0)  # a Task Manager that is down: doubled up to this

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)


class UpsSubscriber(Section):
    """[[ups_watch.subscribers]]: an AE allowed to subscribe to the node's workitems, and where its
    UPS event reports go (PS3.4 leaves a subscriber's address to configuration)."""

    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))


class UpsWatchSettings(Section):
    """[ups_watch]: the node's jobs as UPS workitems on its DICOM listener (C-FIND, N-GET, subscriptions).

    Off by default: the workitems carry patient and study identifiers, and the listener answers any
    AE that [node] allowed_calling_aets lets in."""

    enabled: bool = False
    subscribers: list[UpsSubscriber] = []
    max_matches: int = Field(500, ge=1)  # C-FIND answers at most this many workitems, newest first
    interval_seconds: float = Field(1, gt=0)  # how often serve sends pending event reports
    backoff_initial_seconds: float = Field(5, gt=0)  # a subscriber that cannot be reached is tried again after this
    backoff_max_seconds: float = Field(300, gt=0)  # ... doubled up to this
    timeout_seconds: float = Field(10, gt=0)  # association and DIMSE timeout when sending a report

    @field_validator("subscribers")
    @classmethod
    def _titles(cls, values: list[UpsSubscriber]) -> list[UpsSubscriber]:
        _unique("ups_watch.subscribers", "AE titles", [v.ae_title for v in values])
        return values


class Settings(BaseSettings):
    """The whole configuration of a node."""

    model_config = SettingsConfigDict(env_prefix="DXNODE_", env_nested_delimiter="__", extra="ignore")

    node: NodeSettings = NodeSettings()
    database: DatabaseSettings = DatabaseSettings()
    worklist: WorklistSettings = WorklistSettings()
    destinations: list[Destination] = []
    pipeline: PipelineSettings = PipelineSettings()
    model: ModelSettings = ModelSettings()
    models: list[ModelEntry] = []
    report: ReportSettings = ReportSettings()
    dispatch: DispatchSettings = DispatchSettings()
    web: WebSettings = WebSettings()
    logging: LoggingSettings = LoggingSettings()
    sources: list[Source] = []

    hl7: Hl7Settings = Hl7Settings()

    retention: RetentionSettings = RetentionSettings()
    ups: list[UpsEntry] = []

    ups_watch: UpsWatchSettings = UpsWatchSettings()
    source: str = ""  # the file this configuration was read from (set by load_settings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file, which is passed in as init values below.
        return (env_settings, init_settings)

    @field_validator("models")
    @classmethod
    def _model_names(cls, values: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in values]
        if any(not n.strip() for n in names):
            raise ValueError("every [[models]] entry needs a name")
        _unique("models", "names", names)
        return values

    @field_validator("sources")
    @classmethod
    def _source_names(cls, values: list[Source]) -> list[Source]:
        _unique("sources", "names", [v.name for v in values])
        return values

    @field_validator("ups")
    @classmethod
    def _ups_sources(cls, values: list[UpsEntry], info: ValidationInfo) -> list[UpsEntry]:
        _unique("ups", "names", [u.name for u in values])
        known = [s.name for s in info.data.get("sources", [])]
        for u in values:
            if u.source not in known:
                raise ValueError(
                    f"[[ups]] {u.name!r}: source {u.source!r} is no [[sources]] name ({', '.join(known) or 'none'})"
                )
        return values

    @property
    def data_dir(self) -> Path:
        """Absolute data directory (relative paths are taken from the working directory)."""
        return self.node.data_dir.expanduser().resolve()


TOP_LEVEL_KEYS = set(Settings.model_fields) - {"source"}


def default_config_path() -> Path:
    """The bundled dxnode.toml, shipped inside the package (dxnode/resources)."""
    return Path(str(importlib.resources.files("dxnode.resources").joinpath("dxnode.toml")))


ENV_PREFIX = "DXNODE_"


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the config file, apply environment overrides, raise ConfigError on error.

    Each error names where the bad value came from: the file, or the DXNODE_* variable that set it.
    """
    # start-up time: pydantic_settings loads only when this runs
    from pydantic_settings import SettingsError

    chosen = (
        Path(path)
        if path
        else Path(os.environ["DXNODE_CONFIG"])
        if os.environ.get("DXNODE_CONFIG")
        else default_config_path()
    )
    try:
        raw = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {chosen}") from None
    except IsADirectoryError:
        raise ConfigError(f"{chosen}: is a folder, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{chosen}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
    for name in sorted(set(raw) - TOP_LEVEL_KEYS):
        raise ConfigError(f"{chosen}: unknown section or key {name!r}{_did_you_mean(name, TOP_LEVEL_KEYS)}")
    _check_environment()
    raw.update(overrides)
    try:
        settings = Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, chosen)) from None
    except SettingsError as exc:  # a DXNODE_* value that should be JSON is not
        raise ConfigError(_describe_settings_error(exc)) from None
    settings.source = str(chosen)
    return settings


def _did_you_mean(name: str, known: Any) -> str:
    """' (did you mean port?)' for the closest known name, else ''."""
    close = difflib.get_close_matches(str(name).lower(), sorted(str(k) for k in known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _section_model(section: str) -> type[BaseModel] | None:
    """The model of a top-level section or of the items of a list section, None if unknown."""
    field = Settings.model_fields.get(section)
    if field is None or section == "source":
        return None
    annotation = field.annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_at(loc: Sequence[int | str]) -> list[str]:
    """The field names of the model at a validation error's location (loc without its last key)."""
    model: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = None
        if field is not None:
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    model = candidate
    return list(model.model_fields) if model is not None else []


def _check_environment() -> None:
    """Refuse DXNODE_<SECTION>__<KEY> variables naming an unknown section or key (typos are silent otherwise)."""
    for name in sorted(os.environ):
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, rest = name[len(ENV_PREFIX) :].lower().partition("__")
        found = _section_model(section)
        if found is None:
            raise ConfigError(
                f"environment variable {name}: unknown section {section!r}{_did_you_mean(section, TOP_LEVEL_KEYS)}"
            )
        key = rest.split("__", 1)[0]
        fields = list(found.model_fields)
        if key in RENAMED_KEYS.get(section, {}):
            new = ENV_PREFIX + f"{section}__{RENAMED_KEYS[section][key]}".upper()
            raise ConfigError(f"environment variable {name}: {key!r} in [{section}] was renamed: set {new}")
        if Settings.model_fields[section].annotation is found and key not in fields:
            raise ConfigError(
                f"environment variable {name}: unknown key {key!r} in [{section}]{_did_you_mean(key, fields)}"
            )


def _env_source(loc: Sequence[int | str]) -> str | None:
    """The DXNODE_* variable that set the value at loc, if one did."""
    names = {n.upper(): n for n in os.environ if n.upper().startswith(ENV_PREFIX)}
    parts = [str(p).upper() for p in loc if not isinstance(p, int)]
    for depth in range(len(parts), 0, -1):
        candidate = ENV_PREFIX + "__".join(parts[:depth])
        if candidate in names:
            return names[candidate]
    return None


def _key(loc: Sequence[int | str]) -> str:
    """A dotted key as an admin writes it: web.tokens[0].token."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Values never echoed in an error message.
_SECRET_KEYS = {"token", "session_secret", "url", "password"}


def _describe(exc: ValidationError, source: Path) -> str:
    """The errors, each naming its key and where it came from, e.g. 'f.toml: node.port: ... (got 70000)'."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        where = _env_source(loc)
        origin = f"environment variable {where}" if where else str(source)
        if err["type"] == "extra_forbidden":
            text = f"unknown key{_did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))}"
        else:
            text = str(err["msg"]).removeprefix("Value error, ")
            shown = "input" in err and not isinstance(err["input"], dict | list) and loc and loc[-1] not in _SECRET_KEYS
            text += f" (got {err['input']!r})" if shown else ""
        lines.append(f"{origin}: {_key(loc)}: {text}")
    return "; ".join(lines)


def _describe_settings_error(exc: Exception) -> str:
    """A DXNODE_* variable whose value pydantic-settings could not parse (lists and tables are JSON)."""

    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        model = _section_model(section)
        field = model.model_fields.get(key) if model is not None else None
        scalar = field is not None and field.annotation in (str, int, float, bool, Path)
        if field is not None and not scalar:
            try:
                json.loads(value)
            except ValueError:
                return f"environment variable {name}: not valid JSON (lists and tables are given as JSON, e.g. '[\"CT1\"]')"
    return f"environment: {exc}"


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with secrets hidden: token values, the session secret, database passwords."""

    data = settings.model_dump(mode="json", exclude={"source"})
    for token in data["web"]["tokens"]:
        token["token"] = SECRET
    if data["web"]["session_secret"]:
        data["web"]["session_secret"] = SECRET
    data["database"]["url"] = make_url(data["database"]["url"]).render_as_string(hide_password=True)
    return data


def has_secrets(data: dict[str, Any]) -> bool:
    """True when masked() data hides a secret (so it would not load as it is)."""

    web = data["web"]
    return bool(web["tokens"] or web["session_secret"] or make_url(data["database"]["url"]).password)


def _toml_value(value: Any) -> str:
    """One TOML value (strings JSON-quoted, which TOML accepts for these characters)."""

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def to_toml(data: dict[str, Any]) -> str:
    """Settings data as a TOML document in the bundled file's layout (a value of None is left out: its default)."""
    lines: list[str] = []

    def table(header: str, values: dict[str, Any]) -> None:
        nested = {k: v for k, v in values.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)}
        lines.append(header)
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in nested and v is not None)
        lines.append("")
        for key, items in nested.items():
            for item in items:
                table(f"[[{header.strip('[]')}.{key}]]", item)

    for section, values in data.items():
        if isinstance(values, list):
            for item in values:
                table(f"[[{section}]]", item)
        else:
            table(f"[{section}]", values)
    return "\n".join(lines)

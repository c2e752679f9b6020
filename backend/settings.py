"""Runtime settings, read once from the environment (the names Label Studio's own backends use)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from backend.errors import SettingsError
from backend.media.fetch import MediaSettings


CANDIDATE_CONF = 0.1  # boxes kept for scoring below the serving threshold


def extra_setting(extra: Any, key: str) -> dict[str, str]:
    """extra_params[key] of a Label Studio ML backend (a dict, or its JSON text) as str -> str; {} if absent."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            return {}
    if isinstance(extra, dict) and isinstance(extra.get(key), dict):
        return {str(k): str(v) for k, v in extra[key].items()}
    return {}


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return None


class Settings(BaseModel):
    home: Path = Field(default_factory=lambda: Path("~/.tandem").expanduser())
    model: str | None = None
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    allowed_hosts: frozenset[str] = frozenset()
    local_files_root: Path | None = None
    label_map: dict[str, str] = Field(default_factory=dict)
    case_sensitive_labels: bool = False
    device: str | None = None
    conf: float = Field(default=0.25, ge=0.0, le=1.0)
    engine: Literal["auto", "openvino", "int8", "torch"] = "auto"  # every served version, retrained too
    int8_calibration: Path | None = None  # images like the served ones, for the int8 engine
    imgsz: int | None = None
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 80_000_000
    webhook_secret: str | None = None
    train_after: int = 10
    train_auto_accepted: bool = False  # TANDEM_TRAIN_AUTO_ACCEPTED: fine-tunes also learn from `tandem accept`'s labels
    train_interval_s: float = 0.0
    train_epochs: int = 30
    train_imgsz: int | None = None
    vlm: str | None = None
    vlm_prompts: dict[str, str] = Field(default_factory=dict)
    pre_annotator: Literal["cnn", "vlm"] = "cnn"
    predict_budget_s: float = Field(default=60.0, gt=0)
    max_training_jobs: int = Field(default=2, ge=1)  # training workers at once; further jobs wait queued
    download_deadline_s: float = Field(default=20.0, gt=0)  # one image download, redirects included
    max_downloads_per_host: int = Field(default=4, ge=1)  # at once, per host other than Label Studio
    max_decode_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)  # memory one image may take to decode
    max_cache_bytes: int = Field(default=2 * 1024 * 1024 * 1024, ge=0)  # the on-disk media cache
    reduced_decode: bool = True  # TANDEM_REDUCED_DECODE=0: always decode every pixel (see backend.media.fetch)
    db_url: str | None = None  # TANDEM_DATABASE_URL; None: SQLite under home
    artifacts: str | None = None  # TANDEM_ARTIFACTS: fsspec URL or folder; None: home/artifacts
    lease_seconds: float = Field(default=30.0, gt=0)  # a job whose runner stops heartbeating this long fails
    model_memory_gb: float = Field(default=8.0, gt=0)  # the model pool's budget before it evicts
    max_projects: int = Field(default=10_000, ge=1)  # projects /setup may record; a new one past it is refused
    model_roots: list[Path] = Field(default_factory=list)  # TANDEM_MODEL_ROOTS: more folders callers may name

    def model_spec_refusal(self, spec: str) -> str | None:
        """Why a caller over HTTP (a project's extra params, `POST /predict-jobs`) may not name this model, or
        None. A file or folder must lie under TANDEM_HOME, a local TANDEM_ARTIFACTS, the server's working folder
        or a TANDEM_MODEL_ROOTS folder: loading a checkpoint unpickles it, and whether an arbitrary path loads says what is on the
        host. Registry versions and hub ids are names, read relative to the working folder, so they pass."""
        path = Path(os.path.realpath(Path(spec).expanduser()))
        roots = [self.home, Path.cwd(), *self.model_roots]
        if self.artifacts and "://" not in self.artifacts:  # a local artifact store: where retrains' weights are
            roots.append(Path(self.artifacts).expanduser())
        if any(path.is_relative_to(os.path.realpath(root)) for root in roots):
            return None
        return (f"model {spec!r} is outside the folders a project may name (TANDEM_HOME, the server's working "
                "folder, TANDEM_MODEL_ROOTS): bind it with `tandem models bind`, or add its folder to "
                "TANDEM_MODEL_ROOTS")

    @field_validator("int8_calibration")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        """A CUDA device torch cannot see fails here, at start, not as a 500 on every /predict."""
        if value and re.fullmatch(r"cuda(:\d+)?|\d+(,\d+)*", value.strip()):
            import torch

            wanted = [int(i) for i in re.findall(r"\d+", value)] or [0]
            if not torch.cuda.is_available():
                raise ValueError(f"{value!r} asks for a CUDA GPU but torch sees none (torch.cuda.is_available() is "
                                 "False); use cpu, or leave it unset to use CUDA when present")
            if max(wanted) >= torch.cuda.device_count():
                raise ValueError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return value

    @field_validator("label_studio_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https:// (got {value!r})")
        return value.rstrip("/") if value else value

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Options given win over the environment; a value Tandem cannot run with is a SettingsError naming it."""
        try:
            return cls._from_env(**overrides)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')} (got {e['input']!r})"
                                 for e in exc.errors())
            raise SettingsError(f"invalid setting — {problems}") from None
        except ValueError as exc:  # a TANDEM_* number or JSON variable that does not parse
            raise SettingsError(f"invalid environment variable — {exc}") from None

    @classmethod
    def _from_env(cls, **overrides) -> Settings:
        label_map = _env("TANDEM_LABEL_MAP")
        values = {
            "home": Path(_env("TANDEM_HOME") or "~/.tandem").expanduser(),
            "model": _env("TANDEM_MODEL"),
            "label_studio_url": _env("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
            "label_studio_api_key": _env("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
            "basic_auth_user": _env("BASIC_AUTH_USER"),
            "basic_auth_pass": _env("BASIC_AUTH_PASS"),
            "allowed_hosts": frozenset(h.strip() for h in (_env("TANDEM_ALLOWED_HOSTS") or "").split(",") if h.strip()),
            "local_files_root": _env("LOCAL_FILES_DOCUMENT_ROOT"),
            "label_map": json.loads(label_map) if label_map else {},
            "case_sensitive_labels": (_env("TANDEM_CASE_SENSITIVE_LABELS") or "").lower() in ("1", "true", "yes"),
            "device": _env("TANDEM_DEVICE"),
            "conf": float(_env("TANDEM_CONF") or 0.25),
            "engine": _env("TANDEM_ENGINE") or "auto",
            "int8_calibration": _env("TANDEM_INT8_CALIBRATION"),
            "imgsz": int(_env("TANDEM_IMGSZ")) if _env("TANDEM_IMGSZ") else None,
            "webhook_secret": _env("TANDEM_WEBHOOK_SECRET"),
            "train_after": int(_env("TANDEM_TRAIN_AFTER") or 10),
            "train_auto_accepted": (_env("TANDEM_TRAIN_AUTO_ACCEPTED") or "").lower() in ("1", "true", "yes"),
            "train_interval_s": float(_env("TANDEM_TRAIN_INTERVAL") or 0),
            "train_epochs": int(_env("TANDEM_TRAIN_EPOCHS") or 30),
            "train_imgsz": int(_env("TANDEM_TRAIN_IMGSZ")) if _env("TANDEM_TRAIN_IMGSZ") else None,
            "vlm": _env("TANDEM_VLM"),
            "vlm_prompts": json.loads(_env("TANDEM_VLM_PROMPTS") or "{}"),
            "pre_annotator": _env("TANDEM_PRE_ANNOTATOR") or "cnn",
            "predict_budget_s": float(_env("TANDEM_PREDICT_BUDGET_S") or 60),
            "max_training_jobs": int(_env("TANDEM_MAX_TRAINING_JOBS") or 2),
            "download_deadline_s": float(_env("TANDEM_DOWNLOAD_DEADLINE_S") or 20),
            "max_downloads_per_host": int(_env("TANDEM_MAX_DOWNLOADS_PER_HOST") or 4),
            "max_decode_bytes": int(_env("TANDEM_MAX_DECODE_BYTES") or 1024 * 1024 * 1024),
            "max_cache_bytes": int(_env("TANDEM_MAX_CACHE_BYTES") or 2 * 1024 * 1024 * 1024),
            "reduced_decode": (_env("TANDEM_REDUCED_DECODE") or "1").lower() not in ("0", "false", "no"),
            "db_url": _env("TANDEM_DATABASE_URL"),
            "artifacts": _env("TANDEM_ARTIFACTS"),
            "lease_seconds": float(_env("TANDEM_LEASE_SECONDS") or 30),
            "model_memory_gb": float(_env("TANDEM_MODEL_MEMORY_GB") or 8),
            "max_projects": int(_env("TANDEM_MAX_PROJECTS") or 10_000),
            "model_roots": [Path(p).expanduser() for p in (_env("TANDEM_MODEL_ROOTS") or "").split(os.pathsep) if p],
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return self.basic_auth_user, self.basic_auth_pass
        return None

    @property
    def db_path(self) -> Path:
        return self.home / "tandem.sqlite3"

    @property
    def database_url(self) -> str:
        """TANDEM_DATABASE_URL, or the SQLite file under TANDEM_HOME that the registry and jobs share."""
        return self.db_url or f"sqlite:///{self.db_path.resolve()}"

    def to_env(self) -> dict[str, str]:
        """The same settings as environment variables, for processes Tandem starts (training workers)."""
        pairs = {
            "TANDEM_HOME": str(self.home),
            "LABEL_STUDIO_URL": self.label_studio_url,
            "LABEL_STUDIO_API_KEY": self.label_studio_api_key,
            "TANDEM_ALLOWED_HOSTS": ",".join(sorted(self.allowed_hosts)) or None,
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.local_files_root) if self.local_files_root else None,
            "TANDEM_LABEL_MAP": json.dumps(self.label_map) if self.label_map else None,
            "TANDEM_DEVICE": self.device,
            "TANDEM_CONF": str(self.conf),
            "TANDEM_ENGINE": self.engine,
            "TANDEM_INT8_CALIBRATION": str(self.int8_calibration) if self.int8_calibration else None,
            "TANDEM_IMGSZ": str(self.imgsz) if self.imgsz else None,
            "TANDEM_VLM": self.vlm,
            "TANDEM_VLM_PROMPTS": json.dumps(self.vlm_prompts) if self.vlm_prompts else None,
            "TANDEM_DATABASE_URL": self.db_url,
            "TANDEM_ARTIFACTS": self.artifacts,
            "TANDEM_LEASE_SECONDS": str(self.lease_seconds),
            "TANDEM_TRAIN_AUTO_ACCEPTED": "1" if self.train_auto_accepted else None,
            "TANDEM_REDUCED_DECODE": None if self.reduced_decode else "0",
            "TANDEM_MODEL_ROOTS": os.pathsep.join(str(p) for p in self.model_roots) or None,
        }
        return {k: v for k, v in pairs.items() if v is not None}

    def training_params(self) -> dict:
        return {"epochs": self.train_epochs, "imgsz": self.train_imgsz}

    def load_cnn(self, weights: str | Path, **overrides):
        """The served YOLO adapter for `weights`, with this server's device, engine and size. It keeps boxes down
        to CANDIDATE_CONF: they are stored and scored ("just below the threshold"); annotators are shown those
        at or above `conf` (`ServingPlan.min_confidence`)."""
        from backend.models.open_vocab import is_open_vocab, load_open_vocab
        from backend.models.yolo import YoloAdapter

        if is_open_vocab(str(weights)):  # YOLOE / YOLO-World: promptable, the project's labels are its classes
            sized = {"imgsz": self.imgsz} if self.imgsz else {}
            return load_open_vocab(str(weights), device=self.device, conf=min(self.conf, CANDIDATE_CONF), **sized)
        options = dict(device=self.device, conf=min(self.conf, CANDIDATE_CONF), engine=self.engine, imgsz=self.imgsz,
                       cache_dir=self.home / "cache" / "openvino", calibration=self.int8_calibration)
        return YoloAdapter(weights, **{**options, **overrides})

    def media(self) -> MediaSettings:
        return MediaSettings(
            label_studio_url=self.label_studio_url,
            api_key=self.label_studio_api_key,
            cache_dir=self.home / "cache" / "media",
            allowed_hosts=self.allowed_hosts,
            local_files_root=self.local_files_root,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            download_deadline_s=self.download_deadline_s,
            max_downloads_per_host=self.max_downloads_per_host,
            max_decode_bytes=self.max_decode_bytes,
            max_decode_bytes_total=max(2 * self.max_decode_bytes, 2 * 1024 * 1024 * 1024),
            max_cache_bytes=self.max_cache_bytes,
            reduced_decode=self.reduced_decode,
        )

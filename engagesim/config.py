"""Typed, self-documenting configuration loaded from YAML.

Every setting is a pydantic field with a description (the descriptions feed
``--help`` and the docs). Unknown keys are errors, because a misspelt key that
is silently ignored is the most expensive kind of config bug: the job runs,
with the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the dotted key path that caused it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    s3_endpoint: str | None = Field(
        None,
        description="S3 endpoint URL (http://host:port) for S3-compatible stores; "
        "None uses AWS_ENDPOINT_URL from the environment, else AWS itself. "
        "Credentials always come from the environment or an instance profile.",
    )
    s3_region: str | None = Field(None, description="S3 region; None uses AWS_REGION / AWS_DEFAULT_REGION.")


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster address. None starts an embedded local Ray (the default on one machine); "
        "'auto' joins the cluster this process runs on (inside `ray job submit`).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded local Ray; None uses all.")
    object_store_memory_mb: int | None = Field(
        None, ge=64, description="Object store size for an embedded local Ray, in MiB."
    )


class IngestConfig(Section):
    max_text_chars: int = Field(
        4000, ge=1, description="Posts with longer text are rejected (real tweets are at most 280 chars)."
    )
    batch_rows: int = Field(50_000, ge=1, description="Rows per Parquet part written by the loaders.")


class SynthConfig(Section):
    users: int = Field(2_000, ge=10, description="Number of user accounts (authors are a subset).")
    posts: int = Field(5_000, ge=10, description="Number of posts.")
    impressions: int = Field(200_000, ge=0, description="Number of impressions (interaction rows).")
    images: int = Field(200, ge=0, description="Number of PNG images drawn under <out>/media/.")
    days: int = Field(14, ge=1, description="Days covered by created_at / impression_at.")
    seed: int = Field(0, description="World seed; the same seed gives byte-identical output.")
    rows_per_shard: int = Field(
        250_000, ge=1000, description="Impressions per shard (one Ray task, one Parquet file)."
    )
    workers: int | None = Field(
        None, ge=1, description="Concurrent generator tasks (None = as many as Ray schedules). Output does not depend on it."
    )
    image_size: int = Field(128, ge=32, le=1024, description="Side of each generated square image, in pixels.")
    start: str = Field("2021-02-04T00:00:00+00:00", description="ISO start of the simulated period (UTC).")

    @model_validator(mode="after")
    def _authors_fit(self) -> SynthConfig:
        if self.images > self.posts:
            raise ValueError("images must not exceed posts (each image belongs to one post)")
        return self


class ReportConfig(Section):
    top_accounts: int = Field(15, ge=1, description="Accounts shown in the top-accounts plots.")


class DataConfig(Section):
    source: Literal["synth", "adobe", "posts"] = Field(
        "synth", description="Where the job's data comes from: a generated world, Adobe files, or posts URIs."
    )
    paths: list[str] = Field(default_factory=list, description="Input files/URIs for source adobe/posts.")


class AppConfig(Section):
    """The whole configuration of an engagesim job."""

    output_root: str = Field("runs", description="Where run directories are created (local path or s3:// URI).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{origin}: {path}: {msg}")
    return "\n".join(lines)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``section.key=value`` strings (values parsed as YAML) into a nested dict."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected section.key=value")
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Load a YAML config (default: configs/local.yaml) and apply ``key=value`` overrides."""
    origin = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{origin}: top level must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    try:
        return AppConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None

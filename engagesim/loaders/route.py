"""One entry for every input format: the RecSys logs go to their Ray job (three datasets), the rest to the
streaming file ingest (one contract dataset). The CLI and the behaviour job's data stage both call this."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from engagesim import io
from engagesim.config import AppConfig, StorageConfig
from engagesim.errors import UserError
from engagesim.loaders.ingest import ingest
from engagesim.loaders.readers import FORMATS

RECSYS_FORMATS = ("recsys2021", "recsys2020")
ALL_FORMATS = (*FORMATS, *RECSYS_FORMATS)
KINDS = ("posts", "users", "interactions")  # the contracts a user may ingest into (not internal kinds)


def check_sources(sources: list[str], storage: StorageConfig | None = None) -> list[str]:
    """The input files, checked before any output directory is made or Ray starts: every missing one named."""
    if not sources:
        raise UserError("no input files given")
    unmatched = [s for s in sources if not io.expand_paths([s])]  # a local glob that matches nothing
    paths = io.expand_paths(sources)
    missing = unmatched + [p for p in paths if not io.exists(p, storage)]
    if missing:
        raise UserError(f"no such file: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} "
                        "(check the path; globs are expanded locally)")
    folders = [p for p in paths if not io.is_s3(p) and not os.path.isfile(p)]
    if folders:
        raise UserError(f"not a file: {folders[0]} (give the files inside it, e.g. '{folders[0]}/*.csv')")
    return paths


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """``["tweet_text=text", ...]`` → {source column: contract field}."""
    pairs = {}
    for item in items or []:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise UserError(f"--map {item!r}: expected source_column=contract_field")
        pairs[src] = dst
    return pairs


def check_mapping(pairs: dict[str, str], fmt: str, kind: str) -> None:
    """A --map to a field the contract does not have, or under a format that ignores it, is refused."""
    from engagesim.schema import SCHEMAS

    if not pairs:
        return
    if fmt not in ("csv", "jsonl", "parquet"):
        raise UserError(f"--map applies to --format csv, jsonl or parquet, not {fmt!r} (which knows its columns)")
    fields = [f.name for f in SCHEMAS[kind]]
    unknown = sorted(dst for dst in pairs.values() if dst not in fields)
    if unknown:
        raise UserError(f"--map to unknown {kind} field(s) {', '.join(unknown)}; the fields are: {', '.join(fields)}")


def check_inputs(sources: list[str], fmt: str, kind: str, mapping: dict[str, str] | None,
                 storage: StorageConfig | None = None) -> list[str]:
    """Everything about an ingest that can be wrong before it starts; the expanded input files."""
    if fmt not in ALL_FORMATS:
        raise UserError(f"--format must be one of {', '.join(ALL_FORMATS)}, not {fmt!r}")
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    check_mapping(mapping or {}, fmt, kind)
    return check_sources(sources, storage)


def ingest_files(sources: list[str], fmt: str, out_uri: str, cfg: AppConfig, kind: str = "posts",
                 mapping: dict[str, str] | None = None, tokenizer: str | None = None,
                 log: Callable[[str], None] = lambda _: None,
                 on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Ingest ``sources`` of format ``fmt`` into ``out_uri``; the summary: read, written, rejected, out and
    what the format adds (RecSys: posts, users, seconds, datasets; files: rejects and their reasons)."""
    sources = check_inputs(sources, fmt, kind, mapping, cfg.storage)
    if fmt in RECSYS_FORMATS:
        from engagesim.loaders.recsys_ingest import ingest_recsys

        return ingest_recsys(sources, out_uri, cfg, tokenizer or cfg.ingest.tokenizer, log=log)
    summary = ingest(sources, fmt, out_uri, cfg, kind=kind, mapping=mapping or {}, on_batch=on_batch)
    return {"read": summary.read, "written": summary.written, "rejected": summary.rejected, "out": summary.out,
            "rejects": summary.rejects, "rejects by reason": summary.by_reason}

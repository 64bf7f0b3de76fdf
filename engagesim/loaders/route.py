"""One entry for every input format: the RecSys logs go to their Ray job (three datasets), the rest to the
streaming file ingest (one contract dataset). The CLI and the behaviour job's data stage both call this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engagesim.config import AppConfig
from engagesim.loaders.ingest import ingest
from engagesim.loaders.readers import FORMATS

RECSYS_FORMATS = ("recsys2021", "recsys2020")
ALL_FORMATS = (*FORMATS, *RECSYS_FORMATS)


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """``["tweet_text=text", ...]`` → {source column: contract field}."""
    pairs = {}
    for item in items or []:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise ValueError(f"--map {item!r}: expected source_column=contract_field")
        pairs[src] = dst
    return pairs


def ingest_files(sources: list[str], fmt: str, out_uri: str, cfg: AppConfig, kind: str = "posts",
                 mapping: dict[str, str] | None = None, tokenizer: str | None = None,
                 log: Callable[[str], None] = lambda _: None,
                 on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Ingest ``sources`` of format ``fmt`` into ``out_uri``; the summary: read, written, rejected, out and
    what the format adds (RecSys: posts, users, seconds, datasets; files: rejects and their reasons)."""
    if fmt in RECSYS_FORMATS:
        from engagesim.loaders.recsys_ingest import ingest_recsys

        return ingest_recsys(sources, out_uri, cfg, tokenizer or cfg.ingest.tokenizer, log=log)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(ALL_FORMATS)}")
    summary = ingest(sources, fmt, out_uri, cfg, kind=kind, mapping=mapping or {}, on_batch=on_batch)
    return {"read": summary.read, "written": summary.written, "rejected": summary.rejected, "out": summary.out,
            "rejects": summary.rejects, "rejects by reason": summary.by_reason}

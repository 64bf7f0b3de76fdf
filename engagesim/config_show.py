"""``engagesim config show``: the resolved configuration as YAML a user can copy, each key under its
description, and where it came from when that is not the built-in default.

The descriptions are the pydantic fields' own (the same text ``--help`` and the docs read), so this listing
cannot drift from what the loader accepts: every key it prints is a key ``--set`` takes, and the output
loads back through ``load_config`` to the same configuration (tested).
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml
from pydantic import BaseModel

from engagesim.config import AppConfig

WIDTH = 110


def _scalar(value: Any) -> str:
    """One value in YAML flow style (lists and dicts on one line, strings quoted only where YAML needs it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("\n...").rstrip()  # a bare scalar's document-end marker


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), WIDTH - len(indent) - 2)]


def _lines(model: BaseModel, default: BaseModel | None, indent: str, docs: bool) -> list[str]:
    out: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        base = getattr(default, name) if default is not None else None
        if isinstance(value, BaseModel):
            if docs and (type(value).__doc__ or "").strip() and not indent:
                out += _comment((type(value).__doc__ or "").strip().splitlines()[0], indent)
            out.append(f"{indent}{name}:")
            out += _lines(value, base, indent + "  ", docs)
            continue
        if docs and field.description:
            out += _comment(field.description, indent)
        changed = default is not None and value != base
        note = f"  # default: {_scalar(base)}" if changed else ""
        out.append(f"{indent}{name}: {_scalar(value)}{note}")
    return out


def render(cfg: AppConfig, docs: bool = True, compare: bool = True) -> str:
    """``cfg`` as YAML: every section and key (descriptions as comments with ``docs``), and beside each
    value that differs from the built-in default that default (with ``compare``)."""
    return "\n".join(_lines(cfg, AppConfig() if compare else None, "", docs)) + "\n"

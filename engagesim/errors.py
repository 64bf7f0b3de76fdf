"""Errors that are the user's to fix: the CLI prints them as one line (what is wrong, what to do) and exits 2.

Anything else is a bug and keeps its traceback. ``engagesim --debug`` shows the traceback for these too.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a path, a file, an option); the message says what to do."""


# What each optional extra brings (module names as imported). The behaviour job needs none of them.
EXTRAS = {"content": ("diffusers", "peft", "gguf", "sacrebleu", "rouge_score")}


def require_extra(extra: str) -> None:
    """A ``UserError`` naming the install command when a module of ``extra`` is missing."""
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{extra} simulation needs the [{extra}] extra ({', '.join(missing)} not installed): "
                        f"pip install 'engagesim[{extra}]'")

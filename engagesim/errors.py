"""Errors that are the user's to fix: the CLI prints them as one line (what is wrong, what to do) and exits 2.

Anything else is a bug and keeps its traceback. ``engagesim --debug`` shows the traceback for these too.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a path, a file, an option); the message says what to do."""

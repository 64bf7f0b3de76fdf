"""The README and the CLI agree: every `engagesim …` command in its fenced blocks names commands and options
that exist, with values of the right kind, and the sentence on which commands take --json / --config / --set
matches the commands themselves. (What each command then does is tested by its own module; this catches the
README drifting from the CLI, which a first-hour user met as options that did not exist.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

try:  # typer ≥ 0.20 carries its own click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

from engagesim.cli import app

ROOT = Path(__file__).resolve().parent.parent
CLI = typer.main.get_command(app)


def readme_commands() -> list[str]:
    """Each `engagesim …` line of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("engagesim "):
                lines.append(" ".join(shlex.split(line, comments=True)))
    return lines


def parse(command: Any, args: list[str], name: str = "engagesim") -> str:
    """The command path ``args`` resolve to; raises click's own error for an unknown command or option or a
    value of the wrong type, as the shell would show it. Nothing runs."""
    try:
        ctx = command.make_context(name, list(args), resilient_parsing=False)
    except typer.Exit as done:  # --help / --version: eager, and fine
        assert getattr(done, "exit_code", 0) == 0
        return name
    if not hasattr(command, "commands"):
        return name
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    if not rest:
        return name
    sub_name, sub, rest = command.resolve_command(ctx, rest)
    return f"{name} {parse(sub, rest, sub_name)}"


def leaves(command: Any = CLI, path: tuple[str, ...] = ()) -> dict[str, Any]:
    if hasattr(command, "commands"):
        out: dict[str, Any] = {}
        for name, sub in command.commands.items():
            out.update(leaves(sub, (*path, name)))
        return out
    return {" ".join(path): command}


COMMANDS = readme_commands()


def test_the_readme_shows_every_command():
    shown = {parse(CLI, shlex.split(c)[1:]).removeprefix("engagesim ") for c in COMMANDS}
    assert set(leaves()) - shown - {"tune", "content caption", "content train-llm"} == set()


@pytest.mark.parametrize("line", COMMANDS)
def test_every_readme_command_parses_against_the_cli(line):
    assert parse(CLI, shlex.split(line)[1:]).startswith("engagesim")


def test_which_commands_take_json_config_and_set_is_what_the_readme_says():
    """README: every command takes --json except `serve` (a server) and `config show` (prints YAML); commands
    that start work take --config / --set; those that read a finished run (`evaluate`, `score`, `generate`,
    `report compare`) use the config saved in it."""
    reads_a_run = {"evaluate", "score", "generate", "report compare"}
    for path, command in leaves().items():
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert ("--json" in options) == (path not in {"serve", "config show"}), path
        assert ({"--config", "--set"} <= options) == (path not in reads_a_run), path
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "those that read a finished run (`evaluate`, `score`, `generate`, `report compare`)" in readme


@pytest.mark.parametrize("args", [["evaluate", "--config", "x", "runs/r"], ["synth", "--out", "d", "--users", "abc"],
                                  ["nope"]])
def test_a_readme_command_the_cli_would_refuse_fails_the_parse(args):
    with pytest.raises(UsageError):
        parse(CLI, args)

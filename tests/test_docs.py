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


# ---------------------------------------------------------------------------------------------------------------
# The README run as written. Its two quick-start blocks ("The command line", "Then use the run") run in order in a
# scratch directory laid out like a checkout (configs/, .venv, ../shared/data/adobe), each command through bash as
# a user would paste it. Only what a tiny world needs changes: synth sizes, tiny encoders for the pipeline, a free
# port, and the run id once it exists. Every other README command names the test that runs it (WHERE_ELSE).
# ---------------------------------------------------------------------------------------------------------------

WALKTHROUGH = ("## The command line", "## Content simulation")  # the README span whose blocks run here
TINY_SYNTH = {"--users": "200", "--posts": "300", "--impressions": "6000", "--images": "6"}
TINY_PIPELINE = ["synth.users=150", "synth.posts=400", "synth.impressions=6000", "synth.images=6",
                 "synth.rows_per_shard=6000", "synth.days=5", "features.valid_hours=24", "embed.text_model=tiny:bert",
                 "embed.image_model=tiny:clip", "embed.pca_components=4", "train.xgb.rounds=10", "train.nn.epochs=1"]
# README commands outside the walkthrough → the test that runs them (module::function).
WHERE_ELSE = {
    "make demo": "test_docs::test_the_readme_walkthrough_runs_on_a_tiny_world",  # its job on its config, run here
    "make test": "test_docs::test_every_readme_command_runs_here_or_names_its_test",  # this suite
    "make content": "test_content::test_content_job_writes_a_complete_content_run",
    "engagesim generate": "test_content::test_generate_returns_n_candidates_ranked_by_the_behaviour_run",
    "engagesim serve --run runs/<content_run>": "test_content::test_serve_generate_endpoint_ranks_candidates_behind_the_api_key",
    "engagesim pipeline behaviour --preset": "test_presets::test_preset_runs_end_to_end_on_a_tiny_world",
    "engagesim pipeline content --preset": "test_presets::test_preset_runs_end_to_end_on_a_tiny_world",
    "engagesim report compare": "test_presets::test_report_compare_tables_every_run_with_measured_costs",
    "make reproduce": "test_presets::test_preset_runs_end_to_end_on_a_tiny_world",  # each preset jobs/reproduce.py runs
    "make evaluation": "test_adobe_models::test_the_unseen_data_evaluation_serves_a_later_period_better_than_the_account_mean",
    "engagesim score --snapshot cutoff": "test_run_api::test_score_command_matches_evaluation_and_rejects_bad_rows",
    "ray job submit": "test_cluster::test_job_submission_then_serve_deploy_with_token_and_refusal_without",
    "engagesim serve --run s3://": "test_cluster::test_job_submission_then_serve_deploy_with_token_and_refusal_without",
}


def shell_commands(text: str) -> list[tuple[str, str]]:
    """(command, the comment lines right after it) for each command of the bash blocks in ``text``; a command
    runs on over continuation backslashes and open quotes, as bash reads it."""
    out: list[tuple[str, str]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        pending, output = "", False  # output: the comment lines under a command show what it prints
        for line in block.splitlines():
            if not pending and line.lstrip().startswith("#"):
                said = line.lstrip()[1:].strip()
                output = output and said.startswith(("{", '"'))
                if output:
                    out[-1] = (out[-1][0], out[-1][1] + said + "\n")
                continue
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if pending.rstrip().endswith("\\"):
                continue
            if words:
                command = pending.replace("\\\n", " ")
                out.append((command.strip(), ""))
            pending, output = "", bool(words)
    return out


def walkthrough_span() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = (text.index(h) for h in WALKTHROUGH)
    return text[start:end]


def test_every_readme_command_runs_here_or_names_its_test():
    import importlib

    inside = {c for c, _ in shell_commands(walkthrough_span())}
    for command, _ in shell_commands((ROOT / "README.md").read_text()):
        if command in inside or not command.startswith(("engagesim", "make", "ray job")):
            continue
        where = [t for prefix, t in WHERE_ELSE.items() if command.startswith(prefix)]
        assert where, f"README command run by no test: {command}"
        module, function = where[-1].split("::")
        assert callable(getattr(importlib.import_module(module), function, None)), where[-1]


def _tiny(command: str, port: int) -> str:
    """The README command as a tiny world needs it."""
    if command.startswith("engagesim synth"):
        for option, value in TINY_SYNTH.items():
            command = re.sub(rf"{option} \d+", f"{option} {value}", command)
    if command.startswith("engagesim pipeline behaviour"):
        command += "".join(f" --set {o}" for o in TINY_PIPELINE)
    if command.startswith("engagesim features"):
        command += "".join(f" --set {o}" for o in TINY_PIPELINE if o.startswith("embed."))
    return command.replace("--port 8000", f"--port {port}").replace("localhost:8000", f"localhost:{port}")


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    return set()


@pytest.mark.ray
def test_the_readme_walkthrough_runs_on_a_tiny_world(adobe_dir, tmp_path):
    """The quick-start blocks, command by command, in a directory laid out like a checkout. Also the first-hour
    bound for the demo's job (`make demo` runs this very job on this config): a quiet run's stderr is ≤ 40
    lines and shows each stage and the training progress."""
    import gzip
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from helpers import free_port, quiet_lines, stop_group
    from test_recsys import LINES

    home = tmp_path / "checkout"
    home.mkdir()
    (tmp_path / "shared").symlink_to(adobe_dir.parent.parent)  # ../shared/data/adobe, as beside a clone
    (home / "configs").symlink_to(ROOT / "configs")
    (home / ".venv").symlink_to(Path(sys.prefix))
    # What the README assumes a user already has: RecSys logs, a users CSV, new posts to score (made below).
    (home / "logs").mkdir()
    with gzip.open(home / "logs" / "part-00000.tsv.gz", "wt") as f:
        f.write("\n".join(LINES) + "\n")
    (home / "users.csv").write_text("uid,followers,following_count,verified\nu1,10,2,true\nu2,3,0,false\nu3,-4,1,false\n")
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rdoc", dir="/tmp")}  # short: Ray's socket paths
    port, server, ran = free_port(), None, {}

    def bash(command: str, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"source .venv/bin/activate && {command}"], cwd=home, env=env,
                              capture_output=True, text=True, **kw)

    try:
        for readme_command, shown in shell_commands(walkthrough_span()):
            if readme_command == "source .venv/bin/activate":
                continue  # every command below runs after it
            command = _tiny(readme_command, port)
            if "<run_id>" in command:
                (run_id,) = [p.name for p in (home / "runs").iterdir() if (p / "manifest.json").exists()]
                command = command.replace("<run_id>", run_id)
            if command.startswith("engagesim score"):
                import shutil

                shutil.copytree(home / "data/world/posts", home / "data/new_posts")
            if command.startswith("export "):
                name = command.split("=", 1)[0].removeprefix("export ")
                env[name] = bash(f"{command}\nprintf %s \"${name}\"", timeout=60).stdout  # after its comment
                assert len(env[name]) >= 16
                continue
            if command.startswith("engagesim serve"):
                server = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && exec {command}"], cwd=home,
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)
                continue
            if command.startswith("curl"):
                deadline, answer = time.time() + 180, None
                while answer is None and time.time() < deadline and server.poll() is None:
                    try:
                        answer = json.loads(bash(command, timeout=60).stdout)
                        answer = answer if "likes" in answer else None
                    except ValueError:
                        time.sleep(1)
                assert answer is not None, "the README's curl got no prediction from the README's serve"
                assert set(re.findall(r'"(\w+)":', shown)) <= _keys(answer), (shown, answer)
                ran[readme_command] = answer
                continue
            started = time.perf_counter()
            proc = bash(command, timeout=900)
            print(f"{time.perf_counter() - started:6.1f} s  {readme_command[:90]}")
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (command, proc.stderr[-3000:])
            if shown:  # the output the README shows is the output
                assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(shown), (command, proc.stdout)
            ran[readme_command] = proc
    finally:
        if server is not None:
            stop_group(server)

    def result(prefix: str) -> Any:
        (got,) = [v for k, v in ran.items() if k.startswith(prefix)]
        return got

    assert "pipeline" in result("engagesim --help").stdout
    recsys = json.loads(result("engagesim ingest logs/").stdout.strip().splitlines()[-1])
    assert (recsys["read"], recsys["written"], recsys["rejected"]) == (8, 4, 4)
    assert re.search(r"written\s*│\s*2 ", result("engagesim ingest users.csv").stdout)  # and 1 rejected, with its reason
    assert (home / "data/features").is_dir()
    for plot in ("likes_distribution.png", "likes_by_weekday_hour.png", "top_accounts.png", "media_kinds.png"):
        assert (home / "reports/adobe" / plot).stat().st_size > 5000
        assert plot in (home / "reports/adobe/index.html").read_text()
    assert "rounds: 50" in result("engagesim config show").stdout
    assert "test metrics" in result("engagesim evaluate").stdout
    assert (home / "runs/scores").is_dir()
    # The demo's job, quiet: ≤ 40 lines on stderr, each stage and the training progress among them.
    stderr = result("engagesim pipeline behaviour").stderr
    lines = quiet_lines(stderr)
    assert len(lines) <= 40, stderr
    assert any(x.strip().startswith("impression_xgb_like: round 10/10") for x in lines), stderr
    for stage in ("data", "features", "post", "impression", "evaluation"):
        assert any(x.startswith(stage) for x in lines), (stage, stderr)
    assert not any("Warning" in x for x in lines), stderr

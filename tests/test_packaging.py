"""A non-editable install works from anywhere: the configs and presets ship as package data, the console
script runs, and the config listing is a config file that loads back to the same configuration."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from engagesim.config import DEFAULT_CONFIG, AppConfig, load_config, preset_names
from engagesim.config_show import render

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with engagesim installed from a built wheel (not editable). Its dependencies come from this
    environment's site-packages through a .pth (no network, seconds), placed after the venv's own, so
    ``import engagesim`` finds the wheel's copy and not the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                 "-w", str(wheels)], cwd=tmp)
    assert built.returncode == 0, built.stderr[-2000:]
    venv = tmp / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp).returncode == 0
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_engagesim_deps.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    done = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
                str(next(wheels.glob("engagesim-*.whl")))], cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


def test_the_wheel_runs_from_another_directory_with_its_configs(installed, tmp_path):
    where = run([str(installed / "bin" / "python"), "-c", "import engagesim, engagesim.config as c; "
                 "print(engagesim.__file__); print(c.DEFAULT_CONFIG.exists())"], cwd=tmp_path)
    module, has_default = where.stdout.split()
    assert module.startswith(str(installed)) and has_default == "True", where.stdout + where.stderr
    version = run([str(installed / "bin" / "engagesim"), "--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("engagesim "), version.stderr
    shown = run([str(installed / "bin" / "engagesim"), "config", "show", "--preset", "smp2019"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    listed = yaml.safe_load(shown.stdout)
    assert listed["preset"]["name"] == "smp2019" and listed["synth"]["impressions"] == 400_000  # local.yaml + preset
    missing = run([str(installed / "bin" / "engagesim"), "config", "show", "--preset", "nope"], cwd=tmp_path)
    assert missing.returncode == 2 and "smp2019" in missing.stderr and "Traceback" not in missing.stderr
    assert not any(tmp_path.iterdir())  # showing a config writes nothing


def test_the_wheel_runs_a_preset_pipeline_on_the_adobe_posts(installed, tmp_path, adobe_dir):
    """`engagesim pipeline behaviour --preset smp2019 --data <adobe csv>` from the installed wheel, in another
    directory: the preset comes from package data and the run completes. (400 of the 2,355 real posts and tiny
    encoders, for time; the preset's own models: XGBoost and the stacked MLP.)"""
    import csv
    import json
    import tempfile

    with open(adobe_dir / "train_sample2355_with_likes.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    posts = tmp_path / "posts.csv"
    with open(posts, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[:401])
    ray_tmp = tempfile.mkdtemp(prefix="rwh", dir="/tmp")  # short: Ray's socket paths have a length limit
    done = subprocess.run(
        [str(installed / "bin" / "engagesim"), "pipeline", "behaviour", "--preset", "smp2019", "--data", str(posts),
         "--out", str(tmp_path / "runs"), "--json", "--set", "embed.text_model=tiny:bert",
         "--set", "embed.image_model=tiny:clip", "--set", "train.xgb.rounds=20", "--set", "ray.num_cpus=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    assert done.returncode == 0, done.stderr[-3000:]
    run = Path(json.loads(done.stdout.strip().splitlines()[-1])["run"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert run.parent == tmp_path / "runs" and manifest["status"] == "succeeded"
    assert manifest["config"]["preset"]["name"] == "smp2019"
    assert manifest["metrics"]["test"]["post_level"]["models"]["ensemble"]["rmse"] > 0


@pytest.mark.parametrize("preset", [None, *preset_names()])
def test_config_show_loads_back_to_the_same_config(preset, tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["train.xgb.rounds=7", "features.valid_hours=12"], preset=preset)
    text = render(cfg)
    assert f"    rounds: 7  # default: {AppConfig().train.xgb.rounds}" in text.splitlines()  # train.xgb.rounds
    assert "# Number of impressions" in text  # descriptions as comments
    path = tmp_path / "shown.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    bare = render(cfg, docs=False, compare=False)
    assert not any(line.lstrip().startswith("#") or "  # default:" in line for line in bare.splitlines()) and load_config(_write(tmp_path / "bare.yaml", bare)) == cfg


def test_config_show_defaults_are_the_built_in_ones(tmp_path):
    assert load_config(_write(tmp_path / "d.yaml", render(AppConfig()))) == AppConfig()
    assert "# default:" not in render(AppConfig())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

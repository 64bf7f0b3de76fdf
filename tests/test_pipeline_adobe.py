"""The behaviour job on the real Adobe file, as `make demo` runs it."""

import json

import pytest

from engagesim.config import DEFAULT_CONFIG, load_config
from engagesim.pipeline.behaviour import run


@pytest.fixture(scope="module")
def adobe_run(ray_local, tmp_path_factory, adobe_dir):
    root = tmp_path_factory.mktemp("adobe_runs")
    cfg = load_config(DEFAULT_CONFIG, [f"output_root={root}", "data.source=adobe",
                                       f"data.paths=['{adobe_dir}/content_simulation_train_sample22.xlsx']"])
    return root, run(cfg, "t1", log=lambda _: None)


def test_behaviour_job_on_adobe_writes_manifest_and_report(adobe_run):
    tmp_path, job = adobe_run
    manifest = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["metrics"]["ingest"] == {"read": 22, "written": 22, "rejected": 0}
    assert manifest["inputs"][0]["sha256"]
    assert "git_commit" in manifest["code"] or manifest["code"]["package"]
    assert (tmp_path / "t1" / "reports" / "eda" / "index.html").exists()
    assert job.manifest["stages"]["data"]["outputs"]["posts"].endswith("data/posts")


def test_report_compare_on_real_data_runs(adobe_run, tmp_path):
    """Real data has no oracle: the comparison must still table and plot the runs (with the baseline)."""
    import shutil

    from engagesim.compare import compare

    root, job = adobe_run
    shutil.copytree(root / "t1", tmp_path / "t2")  # a second real-data run (the same numbers, its own name)
    result = compare([job.uri, str(tmp_path / "t2")], str(tmp_path / "compare"), measure=False)
    table = open(result["table"]).read()
    assert "| metric | t1 | t1 |" in table and "| account-mean RMSE |" in table
    assert any(p.endswith("rmse.png") for p in result["plots"])

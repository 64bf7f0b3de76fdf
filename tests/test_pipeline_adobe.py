"""The behaviour job on the real Adobe file, as `make demo` runs it."""

import json

from engagesim.config import DEFAULT_CONFIG, load_config
from engagesim.pipeline.behaviour import run


def test_behaviour_job_on_adobe_writes_manifest_and_report(tmp_path, adobe_dir):
    cfg = load_config(DEFAULT_CONFIG, [f"output_root={tmp_path}", "data.source=adobe",
                                       f"data.paths=['{adobe_dir}/content_simulation_train_sample22.xlsx']"])
    job = run(cfg, "t1", log=lambda _: None)
    manifest = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["metrics"]["ingest"] == {"read": 22, "written": 22, "rejected": 0}
    assert manifest["inputs"][0]["sha256"]
    assert "git_commit" in manifest["code"] or manifest["code"]["package"]
    assert (tmp_path / "t1" / "reports" / "eda" / "index.html").exists()
    assert job.manifest["stages"]["data"]["outputs"]["posts"].endswith("data/posts")

"""load_run / predict / evaluate / score on one finished run: the scoring paths agree with the evaluation."""

import datetime as dt
import json
import os

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import engagesim
from engagesim import io
from engagesim.schema import ENGAGEMENTS

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def run(behaviour_run):
    # The snapshot the validation and test rows were featurised with: these tests check served = evaluated.
    return engagesim.load_run(behaviour_run.uri, snapshot="cutoff")


def _frame(run, *parts):
    return pl.from_arrow(io.read_table(run.path(*parts)))


def test_training_reports_its_progress_in_the_job_log(behaviour_run):
    """Every Ray Train fit's reports reach the driver's log while fit() blocks it: rounds of each booster and
    epochs of the network, out of how many, with the validation loss and the time."""
    import re

    lines = behaviour_run.log_lines
    for fit, unit, total in (("impression_xgb_like", "round", 20), ("impression_nn", "epoch", 2)):
        done = [x for x in lines if x.strip().startswith(f"{fit}: {unit} {total}/{total}")]
        assert done and re.search(r"(valid-\w+|loss) \d+\.\d{4} \(\d+ s\)$", done[-1]), (fit, lines)


def test_progress_line_has_the_eta_from_the_elapsed_time():
    from engagesim.models.progress import line

    got = line({"fit": "post_xgb", "round": 50, "of": 200, "valid-rmse": 0.81234, "seconds_in": 9.0}, 0.0, 10.0)
    assert got == "post_xgb: round 50/200, valid-rmse 0.8123 (10 s, about 30 s left)"
    assert line({"fit": "nn", "epoch": 2, "unit": 3, "of": 3, "loss": 0.5}, 0.0, 4.0) == "nn: epoch 3/3, loss 0.5000 (4 s)"
    assert line({"fit": "x", "round": 120, "of": 200, "final": True}, 0.0, 9.0) == "x: round 120/200 (9 s, stopped early)"
    assert line({"fit": "mlm", "unit": 10, "of": 40, "unit_name": "step"}, 0.0, 5.0) == \
        "mlm: step 10/40 (5 s, about 15 s left)"


def test_run_directory_is_complete(run):
    assert run.manifest["status"] == "succeeded"
    for stage in ("data", "features", "train_post_level", "train_impression_level", "evaluate", "report"):
        assert stage in run.manifest["stages"], stage
    report = os.path.join(run.uri, "reports", "evaluation")
    names = set(os.listdir(report))
    assert {"metrics.json", "index.html", "post_calibration_and_groups.png", "impression_calibration_pr_groups.png",
            "importance_post.png", "importance_impression.png"} <= names
    metrics = json.load(open(os.path.join(report, "metrics.json")))
    assert metrics["valid"] == run.metrics["valid"] and metrics["test"] == run.metrics["test"]
    imp = metrics["test"]["impression_level"]
    assert set(imp["models"]) == {"xgb", "nn", "ensemble"}
    assert imp["oracle"]["like"]["rce"] > 0 and "mean" in imp["models"]["ensemble"]["like"]["rce_by_popularity"]
    post = metrics["test"]["post_level"]
    assert {"xgb", "nn", "knn", "stacked_mlp", "ensemble"} <= set(post["models"])
    # The models learned something: better than predicting the training mean for every post, on the test rows.
    assert post["models"]["ensemble"]["rmse"] < post["baselines"]["global_mean"]["rmse"]
    # Test and validation are different rows: the stacker was fit on the validation ones.
    assert post["rows"] > 0 and run.metrics["valid"]["post_level"]["rows"]["valid"] > 0


def test_predict_posts_from_raw_rows_equals_evaluation(run):
    evaluated = _frame(run, "predictions", "posts")
    raw = _frame(run, "data", "posts").filter(pl.col("post_id").is_in(evaluated["post_id"].implode()))
    assert raw.height == evaluated.height > 0
    fresh = pl.from_arrow(run.predict(raw.drop("likes", "retweets", "replies", "quotes")))
    joined = evaluated.join(fresh, on="post_id", suffix="_fresh")
    assert joined.height == evaluated.height
    assert (joined["log1p_likes"] - joined["log1p_likes_fresh"]).abs().max() <= 1e-6
    # A multi-chunk input table (as concatenated batches arrive) scores the same (a polars conversion bug
    # with sliced fixed-size lists once broke this).
    chunked = pa.concat_tables([raw.head(7).to_arrow(), raw.slice(7).to_arrow()])
    assert pl.from_arrow(run.predict(chunked))["log1p_likes"].equals(fresh["log1p_likes"])
    # No rows in → no rows out, same columns (a scoring batch whose rows were all rejected).
    empty = run.predict(raw.head(0))
    assert empty.num_rows == 0 and empty.column_names == fresh.columns
    # One post alone gets what it got in the batch (no dependence on the other rows).
    one = pl.from_arrow(run.predict(raw.head(1)))
    assert abs(one["log1p_likes"][0] - joined.filter(pl.col("post_id") == raw["post_id"][0])["log1p_likes"][0]) <= 1e-6
    assert (fresh["likes_low"] <= fresh["expected_likes"]).all() and (fresh["expected_likes"] <= fresh["likes_high"]).all()


def test_served_members_give_the_served_ensemble_and_only_its_members(run):
    """``members="served"`` computes what the served ensemble reads: the same ensemble numbers, fewer columns."""
    raw = _frame(run, "data", "posts").head(40).drop("likes", "retweets", "replies", "quotes")
    every, served = (pl.from_arrow(run.predict(raw, members=m)) for m in ("all", "served"))
    assert (every["log1p_likes"] - served["log1p_likes"]).abs().max() == 0
    names = {c[len("log1p_likes_"):] for c in served.columns if c.startswith("log1p_likes_")}
    assert names == run.post_models.served_members() and names <= set(run.post_models.members)
    for name in names:
        assert served[f"log1p_likes_{name}"].equals(every[f"log1p_likes_{name}"])
    assert run.predict(raw.head(0), members="served").column_names == served.columns
    rows = _frame(run, "data", "interactions").head(200).with_columns(pl.lit(None).alias(f"{e}_at") for e in ENGAGEMENTS)
    every, served = (pl.from_arrow(run.predict(rows, members=m)) for m in ("all", "served"))
    for e in ENGAGEMENTS:
        assert (every[f"p_{e}"] - served[f"p_{e}"]).abs().max() == 0
    with pytest.raises(ValueError, match="members"):
        run.predict(raw, members="some")


def test_predict_impressions_from_raw_rows_equals_evaluation(run):
    evaluated = _frame(run, "predictions", "impressions")
    keys = ["user_id", "post_id", "impression_at"]
    raw = _frame(run, "data", "interactions").join(evaluated.select(keys), on=keys, how="semi").head(3000)
    fresh = pl.from_arrow(run.predict(raw.with_columns(pl.lit(None).alias(f"{e}_at") for e in ENGAGEMENTS)))
    joined = evaluated.join(fresh, on=keys, suffix="_fresh")
    assert joined.height == raw.height
    for e in ENGAGEMENTS:
        assert (joined[f"p_{e}"] - joined[f"p_{e}_fresh"]).abs().max() <= 1e-6, e


def test_scoring_from_feature_arrays_equals_scoring_the_feature_table(run, monkeypatch):
    """``predict`` and Serve score from numpy columns: impressions from the ops' ``arrays`` (``impression_arrays``),
    never building the feature table, posts from the feature frame's numeric columns, never converted to Arrow.
    The same numbers exactly — known and new posts mixed, one row and many (index lookups, then hash joins) —
    and where a served member cannot take arrays, the table path."""
    new = (_frame(run, "data", "posts").head(2).drop("likes", "retweets", "replies", "quotes")
           .with_columns(pl.format("{}-new", "post_id").alias("post_id")))
    post_rows = run.post_features(new)
    known = _frame(run, "data", "posts").head(300)  # more than FEW_ROWS: the ops' block paths
    for members in ("served", "all"):
        assert run.score_post_features(post_rows, members).equals(run.score_post_features(post_rows.to_arrow(), members))
        for posts in (new, new.head(1), known, pl.concat([new, new])):  # the post ops' arrays (Serve's posts)
            table = run.score_post_features(run.post_features(posts).to_arrow(), members)
            assert run.score_post_features(run.featurise_posts(posts), members).equals(table), (posts.height, members)
    raw = _frame(run, "data", "interactions").with_columns(pl.lit(None).alias(f"{e}_at") for e in ENGAGEMENTS)
    mixed = pl.concat([raw.head(4), raw.slice(4, 2).with_columns(new["post_id"])])
    for rows in (mixed.tail(1), mixed.head(1), mixed, raw.head(2500)):
        arrays = run.score_impressions(rows, posts=new)
        assert arrays.equals(run.score_impression_features(run.impression_features(rows, posts=new))), rows.height
        # A request's new posts as numpy columns (``FeaturisedPosts``; given twice: the first row, as the frame's)
        for given in (new, pl.concat([new, new])):
            assert run.score_impressions(rows, featurised_posts=run.featurise_posts(given)).equals(arrays)
    with pytest.raises(ValueError, match="no post row for post_id"):
        run.score_impressions(mixed, featurised_posts=run.featurise_posts(new.head(1)))
    expected, calls, table_path = run.score_impressions(mixed, posts=new), [], run.impression_features
    monkeypatch.setattr(run, "impression_features", lambda *a, **k: calls.append(1) or table_path(*a, **k))
    for member in run.impression_models.loaded.values():
        monkeypatch.setattr(type(member), "takes_arrays", False)
    assert run.score_impressions(mixed, posts=new).equals(expected) and calls


def test_streamed_impression_evaluation_equals_the_in_memory_one(run, tmp_path):
    """The evaluation above train.stream_rows (scoring actors on Ray Data, metrics from partial sums)
    writes the same predictions as the in-process one and the same metrics: RCE exactly, AP within the
    histogram's error. That error is one of rank: a bin holding a positive and a negative at different scores
    is counted as randomly interleaved, so it scales with one positive's share of AP (1/P). On this run's
    8.8k validation rows, labels with under 100 positives measured up to 2e-3 (xgb, quote, ~50 positives); on
    its test rows (the later half of them) up to 2.1e-3 for nn, reply, 163 positives, i.e. 0.34/P: the bound
    is max(1e-3, 0.4/P)."""
    from engagesim.pipeline.evaluate import evaluate_impressions

    streamed = evaluate_impressions(run, tmp_path, io.join(str(tmp_path), "predictions"), stream=True)
    exact = json.load(open(os.path.join(run.uri, "reports", "evaluation", "metrics.json")))["test"]["impression_level"]
    assert streamed["rows"] == exact["rows"] and set(streamed["models"]) == set(exact["models"])
    written = io.read_table(io.join(str(tmp_path), "predictions"))
    positives = {e: max(int(pc.sum(written.column(f"y_{e}")).as_py() or 0), 1) for e in ENGAGEMENTS}
    for name in [*exact["models"], "oracle"]:
        got, want = (streamed, exact) if name == "oracle" else (streamed["models"], exact["models"])
        for e in ENGAGEMENTS:
            assert got[name][e]["rce"] == pytest.approx(want[name][e]["rce"], abs=1e-6), (name, e)
            assert abs(got[name][e]["ap"] - want[name][e]["ap"]) < max(1e-3, 0.4 / positives[e]), (name, e)
            assert got[name][e]["rce_by_popularity"] == pytest.approx(want[name][e]["rce_by_popularity"], abs=1e-6)
    keys = ["user_id", "post_id", "impression_at"]
    ours = pl.from_arrow(io.read_table(io.join(str(tmp_path), "predictions"))).sort(keys)
    theirs = _frame(run, "predictions", "impressions").sort(keys)
    assert ours.columns == theirs.columns and ours.height == theirs.height
    for c in ours.columns:
        if c.startswith("p_"):
            assert (ours[c] - theirs[c]).abs().max() <= 1e-6, c
        else:
            assert ours[c].equals(theirs[c]), c
    assert (tmp_path / "impression_calibration_pr_groups.png").exists()


def test_streamed_post_evaluation_equals_the_in_memory_one(run, tmp_path):
    """The post evaluation above train.stream_rows (scoring actors on Ray Data, the account means by a groupby
    and a hash join, RMSE from squared-error sums) gives the in-process figures exactly: every model's RMSE
    overall and per popularity quintile, both baselines, the oracle; and the same predictions."""
    from engagesim.pipeline.evaluate_posts import evaluate_posts

    streamed = evaluate_posts(run, tmp_path, io.join(str(tmp_path), "predictions"), stream=True)
    exact = json.load(open(os.path.join(run.uri, "reports", "evaluation", "metrics.json")))["test"]["post_level"]
    assert streamed["rows"] == exact["rows"] > 50 and set(streamed["models"]) == set(exact["models"])
    for name in exact["models"]:
        assert streamed["models"][name]["rmse"] == pytest.approx(exact["models"][name]["rmse"], abs=1e-6), name
        assert streamed["models"][name]["rmse_by_popularity"] == pytest.approx(
            exact["models"][name]["rmse_by_popularity"], abs=1e-6), name
    for name in ("global_mean", "account_mean"):
        assert streamed["baselines"][name]["rmse"] == pytest.approx(exact["baselines"][name]["rmse"], abs=1e-6)
    assert streamed["oracle"]["rmse"] == pytest.approx(exact["oracle"]["rmse"], abs=1e-6)
    ours = pl.from_arrow(io.read_table(io.join(str(tmp_path), "predictions"))).sort("post_id")
    theirs = _frame(run, "predictions", "posts").sort("post_id")
    assert set(theirs.columns) <= set(ours.columns) and ours.height == theirs.height
    for c in theirs.columns:
        if c.startswith(("log1p_likes", "expected", "likes_")):
            assert (ours[c] - theirs[c]).abs().max() <= 1e-5 * max(1.0, float(theirs[c].abs().max())), c
        else:
            assert ours[c].equals(theirs[c]), c
    assert (tmp_path / "post_calibration_and_groups.png").exists()


def test_cold_start_account_and_viewer(run):
    posts = pl.DataFrame({"post_id": ["new-1"], "author_id": ["never-seen"], "username": ["never-seen"],
                          "text": ["Launching something #new today https://example.com"],
                          "created_at": [dt.datetime(2030, 1, 2, 10, tzinfo=dt.timezone.utc)]})
    out = run.predict(posts)
    assert np.isfinite(out.column("log1p_likes").to_numpy()).all()
    imp = pl.DataFrame({"user_id": ["ghost"], "post_id": ["new-1"], "creator_id": ["never-seen"],
                        "impression_at": [dt.datetime(2030, 1, 2, 11, tzinfo=dt.timezone.utc)]})
    probs = run.predict(imp, posts=posts)
    values = np.array([probs.column(f"p_{e}")[0].as_py() for e in ENGAGEMENTS])
    assert ((values > 0) & (values < 1)).all()
    with pytest.raises(ValueError, match="unknown to the run"):
        run.predict(imp)


def test_python_takes_the_http_request_shape_and_pandas_gets_pandas(run):
    """One input shape for Python and HTTP: ``account`` for the author, ``post_id`` optional (then the id
    /v1/predict gives the same post); the same predictions as contract rows; pandas in, pandas out."""
    from engagesim.serve.api import PostIn, post_id_for

    when = dt.datetime(2025, 6, 2, 10, tzinfo=dt.timezone.utc)  # a request's time: within a year of now
    text = "Launching something #new today"
    contract = run.predict(pl.DataFrame({"post_id": ["p"], "author_id": ["acme"], "username": ["acme"],
                                         "text": [text], "created_at": [when]}))
    shaped = run.predict(pd.DataFrame({"account": ["acme"], "text": [text], "created_at": [when]}))
    assert isinstance(shaped, pd.DataFrame) and len(shaped) == 1
    assert shaped["post_id"][0] == post_id_for(PostIn(account="acme", text=text, created_at=when))
    assert shaped["log1p_likes"][0] == pytest.approx(contract.column("log1p_likes")[0].as_py(), abs=1e-6)
    with pytest.raises(ValueError, match="not both"):
        run.predict([{"account": "a", "author_id": "a", "text": "x", "created_at": when}])


def test_score_command_matches_evaluation_and_rejects_bad_rows(run, tmp_path):
    from engagesim.pipeline.score import score

    evaluated = _frame(run, "predictions", "posts")
    raw = _frame(run, "data", "posts").filter(pl.col("post_id").is_in(evaluated["post_id"].implode()))
    bad = raw.head(3).with_columns(pl.lit(None, dtype=pl.String).alias("text"), (pl.col("post_id") + "-bad").alias("post_id"))
    writer = io.DatasetWriter(str(tmp_path / "in"), "incoming_posts")  # not cast to the contract: bad rows stay bad
    writer.write(pl.concat([raw, bad]).to_arrow())
    writer.commit()
    result = score(run.uri, str(tmp_path / "in"), str(tmp_path / "out"), snapshot="cutoff")
    assert (result["read"], result["scored"], result["rejected"]) == (raw.height + 3, raw.height, 3)
    scored = pl.from_arrow(io.read_table(result["out"])).join(evaluated, on="post_id", suffix="_eval")
    assert scored.height == raw.height
    assert (scored["log1p_likes"] - scored["log1p_likes_eval"]).abs().max() <= 1e-6
    rejects = pl.from_arrow(io.read_table(result["rejects"]))
    assert rejects.height == 3 and rejects["reason"].str.contains("text").all()


def test_every_command_reports_the_same_test_figure(run):
    """pipeline (its printed table), evaluate, /v1/models and report compare all give the served model's
    figure on the untouched test rows; the validation figures are a different section."""
    from helpers import run_cli

    from engagesim.compare import summarise
    from engagesim.report import metric_rows
    from engagesim.serve.predictor import RequestPredictor

    test = run.metrics["test"]
    served = test["post_level"]["models"]["ensemble"]["rmse"]
    rows = [r for r in metric_rows(test) if r["level"] == "post" and "served" in r["note"]]
    assert [(r["model"], r["value"]) for r in rows] == [("ensemble", served)]
    assert summarise(run.uri, measure=False)["rmse"] == served
    assert RequestPredictor(run.uri).models()["metrics"] == test
    proc = run_cli("evaluate", run.uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if " ensemble " in x and "rmse" in x)
    assert f"{served:.4f}" in line and "served" in line
    # Members that lose to the best baseline are flagged in the same table.
    best = min(v["rmse"] for v in test["post_level"]["baselines"].values())
    for r in metric_rows(test):
        if r["level"] == "post" and r["note"] != "baseline":
            assert ("loses to" in r["note"]) == (r["value"] > best), r


def test_an_unknown_snapshot_is_refused_in_one_line(tmp_path):
    """Not served as "cutoff" by default: a typo would silently serve the state the evaluation ended at."""
    from engagesim.errors import UserError

    with pytest.raises(UserError, match="snapshot='cutof': use one of latest, cutoff"):
        engagesim.load_run(str(tmp_path), snapshot="cutof")

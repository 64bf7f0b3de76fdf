"""The foreign RecSys-format world (engagesim/foreign.py), no Ray: logs the RecSys loader reads line by line,
one truth row per line, the same bytes for the same seed, and the knobs doing what they say."""

import gzip

import numpy as np
import polars as pl

from engagesim.foreign import FACTORS, START, WEIGHTS, ForeignWorld, generate
from engagesim.loaders import recsys

SMALL = ForeignWorld(users=800, creators=80, tweets=900, impressions=12_000, days=6, cold_user_share=0.2,
                     cold_days=2, seed=4)


def _lines(out) -> list[str]:
    with gzip.open(out / "logs" / "part-00000.tsv.gz", "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def test_logs_parse_as_recsys_and_match_the_truth_row_for_row(tmp_path):
    made = generate(SMALL, str(tmp_path))
    lines = _lines(tmp_path)
    parsed = [recsys.parse_line(x) for x in lines]  # raises on any malformed line
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    assert len(lines) == truth.height == made["rows"] > 10_000
    assert [p["tweet_id"] for p in parsed] == truth["post_id"].to_list()
    assert [p["user"][0] for p in parsed] == truth["user_id"].to_list()
    assert truth.select("user_id", "post_id").is_unique().all()  # a user sees a tweet once
    for e in ("like", "reply", "retweet", "quote"):
        p = truth[f"p_{e}"].to_numpy()
        assert ((p > 0) & (p < 1)).all()
        engaged = np.array([x[f"{e}_at"] is not None for x in parsed])
        assert abs(engaged.mean() - p.mean()) < 4 * np.sqrt(p.mean() / len(p)) + 0.005  # drawn from the truth
    rates = made["rates"]
    assert rates["like"] > rates["retweet"] > rates["reply"] > rates["quote"] > 0
    # The kept latent factors, with the line's follow flag and photo, give back every probability exactly.
    follows = np.array([x["follows"] for x in parsed], float)
    photo = np.array(["photo" in x["media"] for x in parsed], float)
    factors = [truth[f].to_numpy() for f in FACTORS]
    for e, (a, b_topic, b_quality, b_user, b_follow, b_photo) in WEIGHTS.items():
        z = a + b_topic * factors[0] + b_quality * factors[1] + b_user * factors[2] + b_follow * follows + b_photo * photo
        assert np.allclose(truth[f"p_{e}"].to_numpy(), 1 / (1 + np.exp(-z)), atol=1e-12)


def test_same_seed_same_bytes_and_cold_users_only_at_the_end(tmp_path):
    generate(SMALL, str(tmp_path / "a"))
    generate(SMALL, str(tmp_path / "b"))
    assert _lines(tmp_path / "a") == _lines(tmp_path / "b")
    truth = pl.read_parquet(tmp_path / "a" / "truth.parquet")
    first = truth.group_by("user_id").agg(pl.col("impression_at").min().dt.epoch("s").alias("first"))
    late = first.filter(pl.col("first") >= START + (SMALL.days - SMALL.cold_days) * 86_400).height
    # Cold users (a fifth) see only the last two days' tweets; warm users start any time, mostly earlier.
    assert 0.15 < late / first.height < 0.5


def test_the_gap_diagnostic_names_the_factor_a_model_misses():
    """jobs/evaluation.py's with_factors: a model that knows the propensity but not the affinity gains much from
    the true affinity and nothing from the propensity it already has."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("evaluation_job", Path(__file__).parents[1] / "jobs" / "evaluation.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rng = np.random.default_rng(0)
    n = 20_000
    frame = pl.DataFrame({f: rng.normal(size=n) for f in FACTORS})
    z = -0.5 + frame["affinity"].to_numpy() + frame["user_propensity"].to_numpy()
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    model = 1 / (1 + np.exp(-(-0.4 + frame["user_propensity"].to_numpy())))  # blind to the affinity
    got = job.with_factors(y, model, frame)
    base = job.rce(y, model)
    assert got["+affinity"] > base + 5
    assert abs(got["+user_propensity"] - base) < 1 and abs(got["+creator_quality"] - base) < 1

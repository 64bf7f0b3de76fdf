"""The foreign RecSys-format world (engagesim/foreign.py), no Ray: logs the RecSys loader reads line by line,
one truth row per line, the same bytes for the same seed, and the knobs doing what they say."""

import gzip

import numpy as np
import polars as pl

from engagesim.foreign import START, ForeignWorld, generate
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


def test_same_seed_same_bytes_and_cold_users_only_at_the_end(tmp_path):
    generate(SMALL, str(tmp_path / "a"))
    generate(SMALL, str(tmp_path / "b"))
    assert _lines(tmp_path / "a") == _lines(tmp_path / "b")
    truth = pl.read_parquet(tmp_path / "a" / "truth.parquet")
    first = truth.group_by("user_id").agg(pl.col("impression_at").min().dt.epoch("s").alias("first"))
    late = first.filter(pl.col("first") >= START + (SMALL.days - SMALL.cold_days) * 86_400).height
    # Cold users (a fifth) see only the last two days' tweets; warm users start any time, mostly earlier.
    assert 0.15 < late / first.height < 0.5

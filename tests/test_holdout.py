"""The evaluation splits of docs/evaluation.md (no Ray): forward in time with a gap, accounts thinned to their
latest 1–3 training posts, accounts held out whole; and the baselines beside them."""

import datetime as dt

import numpy as np
import polars as pl
import pytest

from engagesim import holdout

UTC = dt.timezone.utc


def _posts(n: int = 600, accounts: int = 40, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    start = dt.datetime(2020, 1, 1, tzinfo=UTC)
    return pl.DataFrame({
        "post_id": [f"p{i}" for i in range(n)], "author_id": [f"a{int(a)}" for a in rng.integers(0, accounts, n)],
        "created_at": [start + dt.timedelta(hours=int(h)) for h in rng.integers(0, 24 * 365, n)],
        "likes": rng.integers(0, 1000, n)})


def test_later_period_is_forward_in_time_with_its_gap():
    posts = _posts()
    split = holdout.later_period(posts, test_fraction=0.2, gap_days=30)
    assert split.test.height == pytest.approx(0.2 * posts.height, abs=2)
    assert split.train["created_at"].max() < split.test["created_at"].min() - dt.timedelta(days=30)
    assert not set(split.train["post_id"]) & set(split.test["post_id"])


def test_thinned_accounts_keep_their_latest_one_to_three_training_posts():
    posts = _posts()
    full = holdout.later_period(posts)
    split = holdout.thinned(posts, keep=(1, 3), seed=0)
    per = split.train.group_by("author_id").len()
    assert per["len"].min() >= 1 and per["len"].max() <= 3 and len(set(per["len"])) > 1
    for author, kept in split.train.group_by("author_id").agg(pl.col("created_at").min()).iter_rows():
        later = full.train.filter((pl.col("author_id") == author) & (pl.col("created_at") > kept))
        assert later.height <= 2  # what was kept is the account's latest posts
    assert set(split.test["author_id"]) <= set(split.train["author_id"])  # the test has only sparse, seen accounts
    assert split.summary()["test_share_of_seen_accounts"] == 1.0
    assert holdout.thinned(posts, seed=0).train.equals(split.train)  # seeded: the same split every time
    assert not holdout.thinned(posts, seed=1).train.equals(split.train)


def test_new_accounts_are_held_out_whole_and_the_same_every_time():
    posts = _posts(accounts=80)
    split = holdout.new_accounts(posts, fraction=0.25, seed=0)
    assert not set(split.train["author_id"]) & set(split.test["author_id"])
    assert split.summary()["test_share_of_seen_accounts"] == 0.0
    assert 5 <= split.test["author_id"].n_unique() <= 40
    assert holdout.new_accounts(posts.sample(fraction=1.0, shuffle=True, seed=3), fraction=0.25).test[
        "post_id"].sort().equals(split.test["post_id"].sort())  # row order does not choose the accounts
    base = holdout.baselines(split.train, split.test)
    np.testing.assert_allclose(base["account_mean"], base["global_mean"])  # nobody to take a mean of


def test_baselines_are_the_training_means():
    train = pl.DataFrame({"author_id": ["a", "a", "b"], "likes": [0, 3, 7]})
    test = pl.DataFrame({"author_id": ["b", "a", "c"], "likes": [1, 1, 1]})
    base = holdout.baselines(train, test)
    mean = np.log1p([0, 3, 7]).mean()
    np.testing.assert_allclose(base["global_mean"], [mean] * 3)
    np.testing.assert_allclose(base["account_mean"], [np.log1p(7), np.log1p([0, 3]).mean(), mean])

"""Evaluation splits that mimic what a served model meets and its own validation does not (issue 21).

A run's test split is the latest rows of the accounts it trained on, each with its full history. Real
users score posts of accounts with two old posts, of accounts never seen, months later. Each maker here
cuts one contract posts table (``schema.POSTS``) into (train, test) so that the test rows are in that
condition; ``jobs/evaluation.py`` trains a run on ``train`` as a user would and scores ``test`` through
``load_run().predict``, with the baselines beside the models (``docs/evaluation.md``).

Every split is forward in time with a gap: training posts end ``gap_days`` before the first test post, so
nothing of the test period leaks into training through other accounts. Pure polars, no Ray.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Split:
    name: str
    train: pl.DataFrame
    test: pl.DataFrame
    what: str  # one line for the report

    def summary(self) -> dict:
        per = self.train.group_by("author_id").len()["len"]
        seen = self.test["author_id"].is_in(self.train["author_id"].implode())
        return {"train_posts": self.train.height, "train_accounts": len(per),
                "train_posts_per_account_median": float(per.median()) if len(per) else 0.0,
                "test_posts": self.test.height, "test_accounts": self.test["author_id"].n_unique(),
                "test_share_of_seen_accounts": float(seen.mean()) if self.test.height else 0.0}


def _cut(posts: pl.DataFrame, test_fraction: float, gap_days: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Posts before the gap, and the latest ``test_fraction`` of posts after it."""
    posts = posts.filter(pl.col("likes").is_not_null()).sort("created_at", "post_id")
    start = posts["created_at"][int(posts.height * (1 - test_fraction))]
    train = posts.filter(pl.col("created_at") < start - dt.timedelta(days=gap_days))
    return train, posts.filter(pl.col("created_at") >= start)


def later_period(posts: pl.DataFrame, test_fraction: float = 0.2, gap_days: float = 30) -> Split:
    """The user's case: train on the past, score the accounts' later posts."""
    train, test = _cut(posts, test_fraction, gap_days)
    return Split("later_period", train, test, f"latest {test_fraction:.0%} of posts, {gap_days:g}-day gap before")


def thinned(posts: pl.DataFrame, keep: tuple[int, int] = (1, 3), test_fraction: float = 0.2,
            gap_days: float = 30, seed: int = 0) -> Split:
    """``later_period``, with each account's training posts thinned to a random k in ``keep`` (its latest k:
    a sparse account is one that posts rarely, so what is left is its recent past). Test: the later posts of
    the accounts that kept training posts, the ones whose account mean is defined but noisy."""
    train, test = _cut(posts, test_fraction, gap_days)
    rng = np.random.default_rng(seed)
    accounts = train["author_id"].unique().sort()
    k = pl.DataFrame({"author_id": accounts, "_k": rng.integers(keep[0], keep[1] + 1, len(accounts))})
    train = (train.join(k, on="author_id")
             .with_columns(pl.col("created_at").rank("ordinal", descending=True).over("author_id").alias("_r"))
             .filter(pl.col("_r") <= pl.col("_k")).drop("_k", "_r").sort("created_at", "post_id"))
    test = test.filter(pl.col("author_id").is_in(train["author_id"].implode()))
    return Split("thinned_accounts", train, test,
                 f"later period, each account's training posts thinned to its latest {keep[0]}–{keep[1]}")


def _held_out(author: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha1(f"{seed}\x00{author}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def new_accounts(posts: pl.DataFrame, fraction: float = 0.2, test_fraction: float = 0.2, gap_days: float = 30,
                 seed: int = 0) -> Split:
    """The brand split: a ``fraction`` of accounts (by a seeded hash of the id) never trains; the test is
    their later-period posts. Their account mean is undefined, so the baseline is the global mean."""
    train, test = _cut(posts, test_fraction, gap_days)
    accounts = posts["author_id"].unique().sort()
    held = accounts.filter(pl.Series([_held_out(a, fraction, seed) for a in accounts], dtype=pl.Boolean))
    return Split("new_accounts", train.filter(~pl.col("author_id").is_in(held.implode())),
                 test.filter(pl.col("author_id").is_in(held.implode())),
                 f"{fraction:.0%} of accounts held out whole; their later-period posts")


def baselines(train: pl.DataFrame, test: pl.DataFrame) -> dict[str, np.ndarray]:
    """The global and per-account training means of log1p(likes), per test row (global for a new account)."""
    y = train.select(pl.col("likes").log1p().alias("y"))
    mean = float(y["y"].mean())
    acct = train.group_by("author_id").agg(pl.col("likes").log1p().mean().alias("m"))
    per = test.select("author_id").join(acct, on="author_id", how="left", maintain_order="left")["m"]
    return {"global_mean": np.full(test.height, mean), "account_mean": per.fill_null(mean).to_numpy()}

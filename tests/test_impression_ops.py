"""The feature-op contract over every impression op kind (features/impression_ops.py), as tests/test_ops.py runs
it over the post ops: partial fits on interleaved blocks, combined by key, give the same transform as one fit
on the whole log; a keyed op fit per key-hash partition (what each Ray task of ``pipeline/partitioned.py``
holds) answers its partition's rows as the whole fit does; save → load through ``ImpressionState`` gives the
same served values; and every column an op makes is one it declares, in order. No Ray: the Ray executor's side
is ``tests/test_behaviour_ray.py::test_partitioned_executor_equals_the_in_process_one``.
"""

import datetime as dt
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engagesim.features import history
from engagesim.features import ops as feature_ops
from engagesim.features.impression import impression_post_columns, with_topic
from engagesim.features.impression_ops import Accounts, Graph, History, Joins, PostSide, impression_ops
from engagesim.features.post_ops import user_attributes
from engagesim.features.state import ImpressionState
from engagesim.schema import ENGAGEMENTS
from tests.helpers import frame_mismatches

UTC = dt.timezone.utc
T0 = dt.datetime(2021, 1, 1, tzinfo=UTC)
ALWAYS_APPLY = -(2**62)


def _world(n: int = 3000, seed: int = 0):
    """A 5-day log of 40 viewers × 15 creators (6 posts each, 4 topics), its users and its post table."""
    rng = np.random.default_rng(seed)
    creator = rng.integers(0, 15, n)
    at = [T0 + dt.timedelta(seconds=float(s)) for s in rng.uniform(0, 5 * 86400, n)]
    log = pl.DataFrame({"user_id": [f"u{i}" for i in rng.integers(0, 40, n)],
                        "creator_id": [f"u{c}" for c in creator],
                        "post_id": [f"p{c}_{k}" for c, k in zip(creator, rng.integers(0, 6, n))],
                        "impression_at": at, "follows_creator": rng.random(n) < 0.4})
    log = log.with_columns(pl.col("impression_at").dt.cast_time_unit("us"))
    for e, p in zip(ENGAGEMENTS, (0.3, 0.08, 0.1, 0.03)):
        hit = pl.Series(rng.random(n) < p)
        log = log.with_columns(pl.when(hit).then(pl.col("impression_at") + pl.duration(minutes=1)).alias(f"{e}_at"))
    users = pl.DataFrame({"user_id": [f"u{i}" for i in range(40)], "follower_count": np.arange(40) * 10,
                          "following_count": np.arange(40) % 7, "verified": [i % 3 == 0 for i in range(40)],
                          "created_at": [T0 - dt.timedelta(days=30 + i) for i in range(40)]})
    post_ids = sorted(set(log["post_id"]))
    posts = pl.DataFrame({"post_id": post_ids, "n_words": np.arange(len(post_ids), dtype=np.float32),
                          "text_cluster": [hash(p) % 4 for p in post_ids], "likes": np.ones(len(post_ids))})
    return log, user_attributes(users), posts


def _prepared(log: pl.DataFrame, posts: pl.DataFrame):
    origin = int(log["impression_at"].dt.epoch("us").min())
    df = with_topic(history.with_labels_and_windows(log, origin, 24), posts.select("post_id", pl.col("text_cluster")
                                                                                    .alias("topic")))
    cutoff = int(df["t_us"].max()) - 24 * 3600 * 10**6
    return df, cutoff


def _fresh(name: str, users, posts):
    table = impression_post_columns(posts)
    ops = impression_ops(history.GROUPS, "window", 5, 0, users, table,
                         posts.select("post_id", pl.col("text_cluster").alias("topic")), table.columns)
    return next(op for op in ops if op.name == name)


KINDS = [f"history_{p}" for p in history.GROUPS] + ["graph", "accounts", "posts"]


@pytest.mark.parametrize("name", KINDS)
def test_every_impression_op_fits_by_parts_and_partitions_and_survives_save_and_load(name, tmp_path):
    log, users, posts = _world()
    df, cutoff = _prepared(log, posts)
    train = df.filter(pl.col("t_us") < cutoff)
    at = Joins(cutoff, "window")
    whole = _fresh(name, users, posts)
    feature_ops.fit_in_process([whole], train)
    expected = whole.transform(df, at)
    assert expected.columns == whole.columns() and expected.height == df.height
    assert whole.provenance.source and whole.provenance.leak

    if whole.fits:
        # Interleaved blocks (none is a time range), their parts summed / maximised by key.
        op = _fresh(name, users, posts)
        blocks = [train.filter(pl.Series(np.arange(train.height) % 3 == b)) for b in range(3)]
        op.combine([feature_ops.sum_by_keys(op, pl.concat([op.fit_partial(b) for b in blocks]))])
        assert frame_mismatches(op.transform(df, at).with_row_index(), expected.with_row_index(), ["index"]) == []
    if isinstance(whole, History):
        # One op per key-hash partition, fit on its rows only, answers that partition's rows.
        key = history.PARTITION_KEY[whole.prefix]
        part_of = df[key].hash(7).to_numpy() % 3
        pieces = []
        for p in range(3):
            rows = df.filter(pl.Series(part_of == p))
            op = _fresh(name, users, posts)
            feature_ops.fit_in_process([op], rows.filter(pl.col("t_us") < cutoff))
            pieces.append(op.transform(rows, at).with_columns(pl.Series("_i", np.flatnonzero(part_of == p))))
        got = pl.concat(pieces).sort("_i")
        assert frame_mismatches(got, expected.with_columns(pl.Series("_i", np.arange(df.height))), ["_i"]) == []

    # Save → load through the state's generic loop: the served (apply) values are the same.
    state = ImpressionState(0, cutoff, 24, [whole])
    state.save(str(tmp_path / "state"))
    loaded = ImpressionState.load(str(tmp_path / "state"))
    assert [op.name for op in loaded.ops] == [name]
    loaded.index_for_lookups()  # serving's lookups by index give the same rows
    serve = Joins(ALWAYS_APPLY)
    assert frame_mismatches(loaded.ops[0].transform(df, serve).with_row_index(),
                            whole.transform(df, serve).with_row_index(), ["index"]) == []


def test_the_state_is_its_ops_in_column_order_and_an_old_state_loads_the_same(tmp_path):
    log, users, posts = _world()
    df, cutoff = _prepared(log, posts)
    side = impression_post_columns(posts)
    ops = impression_ops(history.GROUPS, "window", 5, 0, users, side, posts.select(
        "post_id", pl.col("text_cluster").alias("topic")), side.columns)
    feature_ops.fit_in_process(ops, df.filter(pl.col("t_us") < cutoff))
    state = ImpressionState(0, cutoff, 24, ops)
    provenance = state.provenance()
    assert provenance["pair_like_rate"].leak.startswith("label-derived")
    assert provenance["cf_similarity"].leak.startswith("label-derived")
    assert provenance["user_account_age_days"].leak.endswith("no labels")
    assert "post_n_words" not in provenance  # the post op that made n_words says (the manifest's job)

    uri = tmp_path / "state"
    state.save(str(uri))
    meta = json.loads((uri / "state.json").read_text())
    assert meta["ops"] == [*(f"history_{p}" for p in history.GROUPS), "graph", "accounts", "posts"]
    del meta["ops"]  # as states saved before the ops had names, groups in alphabetical order
    meta["history"] = sorted(meta["history"])
    (uri / "state.json").write_text(json.dumps(meta))
    old = ImpressionState.load(str(uri))
    assert [op.name for op in old.ops] == [op.name for op in ops]
    assert old.topics is not None and old.posts.height == side.height
    assert frame_mismatches(pl.from_arrow(_serve(old, df)).with_row_index(),
                            pl.from_arrow(_serve(state, df)).with_row_index(), ["index"]) == []


def _serve(state: ImpressionState, df: pl.DataFrame) -> pa.Table:
    from engagesim.features.impression import join_impressions

    raw = df.select("user_id", "creator_id", "post_id", "impression_at", "follows_creator",
                    *[f"{e}_at" for e in ENGAGEMENTS])
    return join_impressions(raw.to_arrow(), state.ops, state.origin_us, state.window_hours, Joins(ALWAYS_APPLY))


def test_a_history_op_carries_columns_a_partition_join_made():
    log, users, posts = _world(600)
    df, cutoff = _prepared(log, posts)
    op = History("user", "window")
    feature_ops.fit_in_process([op], df.filter(pl.col("t_us") < cutoff))
    made = op.transform(df, Joins(cutoff, "window"))
    carried = History("user", "window")  # no tables: the rows already carry the columns
    assert carried.transform(pl.concat([df, made], how="horizontal"), Joins(cutoff, "window")).equals(made)
    assert isinstance(_fresh("graph", users, posts), Graph) and isinstance(_fresh("accounts", users, posts), Accounts)
    assert isinstance(_fresh("posts", users, posts), PostSide)


def test_join_rounds_run_the_key_with_fewest_groups_first():
    """Each round's shuffle carries the columns earlier rounds added, so the one-group post_id round precedes the
    user_id round (user, pair, topic); tables at or under the size limit are broadcast instead."""
    from engagesim.pipeline.partitioned import split_by_size

    rows = {"user": 5, "creator": 2, "pair": 9, "post": 7, "topic": 8}
    rounds, broadcast = split_by_size(rows, 1)
    assert list(rounds) == ["creator_id", "post_id", "user_id"]
    assert rounds["user_id"] == ["user", "pair", "topic"] and broadcast == []
    rounds, broadcast = split_by_size(rows, 6)
    assert list(rounds.items()) == [("post_id", ["post"]), ("user_id", ["pair", "topic"])]
    assert broadcast == ["user", "creator"]


def test_test_rows_read_the_history_of_the_validation_period_too_and_serving_every_labelled_row(tmp_path):
    """History.extend: validation rows read the training totals; test rows the totals over training and
    validation events (a user who arrived in the validation period has a history there); a loaded run serves
    the test rows' snapshot with snapshot="cutoff" and every labelled event with "latest"."""
    import shutil


    log, users, posts = _world(3000)
    df, cutoff = _prepared(log, posts)
    test_from = cutoff + 12 * 3600 * 10**6
    # A user seen only after the cutoff: the validation period is all the history it has.
    late = df.filter((pl.col("t_us") >= cutoff - 3 * 24 * 3600 * 10**6)).with_columns(user_id=pl.lit("newcomer"))
    df = pl.concat([df, late.with_columns(t_us=pl.col("t_us") + 3 * 24 * 3600 * 10**6 - 3600 * 10**6)
                    .filter(pl.col("t_us") >= cutoff)])
    periods = [df.filter(pl.col("t_us") < cutoff), df.filter((pl.col("t_us") >= cutoff) & (pl.col("t_us") < test_from)),
               df.filter(pl.col("t_us") >= test_from)]
    op = History("user", "window")
    feature_ops.fit_in_process([op], periods[0])
    op.extend(op.fit_partial(periods[1]), op.fit_partial(periods[2]))
    got = op.transform(df, Joins(cutoff, "window", test_from_us=test_from))
    rows = {"valid": (df["t_us"] >= cutoff) & (df["t_us"] < test_from), "test": df["t_us"] >= test_from}
    for split, events in (("valid", periods[0]), ("test", pl.concat(periods[:2]))):
        want = history.history_features(df.filter(rows[split]), "apply", events).select(op.columns())
        assert frame_mismatches(got.filter(rows[split]).with_row_index(), want.with_row_index(), ["index"]) == []
    newcomer = df["user_id"] == "newcomer"
    assert (got.filter(newcomer & rows["valid"])["user_n"] == 0).all()
    assert (got.filter(newcomer & rows["test"])["user_n"] > 0).all()

    state = ImpressionState(0, cutoff, 24, [op])
    state.save(str(tmp_path / "state"))
    serve = Joins(ALWAYS_APPLY)
    test_rows = df.filter(rows["test"])
    as_evaluated = ImpressionState.load(str(tmp_path / "state"), snapshot="cutoff").ops[0].transform(test_rows, serve)
    assert frame_mismatches(as_evaluated.with_row_index(), got.filter(rows["test"]).with_row_index(), ["index"]) == []
    latest = ImpressionState.load(str(tmp_path / "state")).ops[0].transform(test_rows, serve)
    want = history.history_features(test_rows, "apply", df).select(op.columns())
    assert frame_mismatches(latest.with_row_index(), want.with_row_index(), ["index"]) == []
    for snapshot in ("recent", "latest"):  # a run saved before the snapshots serves its training totals
        shutil.rmtree(tmp_path / "state" / "history" / "user" / snapshot)
    old = ImpressionState.load(str(tmp_path / "state")).ops[0].transform(test_rows, serve)
    want = history.history_features(test_rows, "apply", periods[0]).select(op.columns())
    assert frame_mismatches(old.with_row_index(), want.with_row_index(), ["index"]) == []

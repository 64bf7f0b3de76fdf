"""Impression rows + the fitted snapshot → the impression feature table.

Pure (polars/numpy): the Ray pipeline maps it over blocks, the benchmark's
single-process baseline calls it on the whole table, and scoring/serving call
it on new rows with a loaded ``ImpressionState``'s ops.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim.config import COMMUNITY_FOLDS, LEIDEN_MAX_EDGES
from engagesim.features import history
from engagesim.features.impression_ops import History, Joins, PostSide, impression_ops
from engagesim.features.lookup import float32_frame, left_lookup
from engagesim.features.ops import FeatureOp, first, fit_in_process
from engagesim.schema import ENGAGEMENTS

POST_ONLY = ("author_id", "username", "created_at", "likes", "split", "label_log1p_likes", "text_emb", "text_sketch",
             "image_emb")


def post_side_columns(columns: list[str]) -> dict[str, str]:
    """Post table column → its name on an impression row: everything but ids, labels and raw vectors, as post_*."""
    return {c: c if c == "post_id" else f"post_{c}" for c in columns if c not in POST_ONLY}


def impression_post_columns(post_table: pl.DataFrame) -> pl.DataFrame:
    """The post features an impression row carries (``post_side_columns``)."""
    names = post_side_columns(post_table.columns)
    return post_table.select(list(names)).rename(names)


def topics_of(post_table: pl.DataFrame) -> pl.DataFrame | None:
    """post_id → topic (the text cluster), or None when posts carry no text embedding."""
    if "text_cluster" not in post_table.columns:
        return None
    return post_table.select("post_id", pl.col("text_cluster").alias("topic"))


def with_topic(df: pl.DataFrame, topics: pl.DataFrame | None, extra: pl.DataFrame | None = None) -> pl.DataFrame:
    """Attach each impression's post topic (text cluster) so the user × topic history can be built
    (``extra``: topics of posts the snapshot lacks, e.g. a request's new post)."""
    if topics is None:
        return df
    if "topic" in df.columns:  # the join would keep both
        return df.join(topics if extra is None else pl.concat([topics, extra], how="vertical_relaxed"),
                       on="post_id", how="left", maintain_order="left")
    return left_lookup(df, topics, "post_id", extra)


def prepare(batch: pa.Table, origin_us: int, window_hours: int, topics: pl.DataFrame | None = None,
            topics_extra: pl.DataFrame | None = None) -> pl.DataFrame:
    """Labels, µs time, window index and topic of each impression row (the history join's inputs)."""
    few = history.few_labels_and_windows(batch, origin_us, window_hours)
    df = (pl.from_arrow(few) if few is not None
          else history.with_labels_and_windows(pl.from_arrow(batch), origin_us, window_hours))
    return with_topic(df, topics, topics_extra)


def history_columns(df: pl.DataFrame, train_tables: dict, apply_tables: dict, cutoff_us: int,
                    history_mode: str, recent_tables: dict | None = None,
                    test_from_us: int | None = None) -> pl.DataFrame:
    """History features of ``df`` (from ``prepare``) for the groups in the tables; row-aligned (Float32, NaN as
    null): ``history_arrays`` as a frame."""
    return float32_frame(history_arrays(df, train_tables, apply_tables, cutoff_us, history_mode, recent_tables,
                                        test_from_us))


def history_arrays(df: pl.DataFrame, train_tables: dict, apply_tables: dict, cutoff_us: int,
                   history_mode: str, recent_tables: dict | None = None,
                   test_from_us: int | None = None) -> dict[str, np.ndarray]:
    """History features of ``df`` as float64 numpy columns (NaN: missing); row-aligned.

    Training rows read the ``history_mode`` tables (key × window), rows past the cutoff the apply totals, and
    rows from ``test_from_us`` the recent ones (training + validation period) when there are any.
    """
    if not train_tables and not apply_tables:
        return {}
    t = df["t_us"].to_numpy()
    periods = [(t < cutoff_us, history_mode, train_tables)]
    if recent_tables is not None and test_from_us is not None:
        periods += [((t >= cutoff_us) & (t < test_from_us), "apply", apply_tables),
                    (t >= test_from_us, "apply", recent_tables)]
    else:
        periods.append((t >= cutoff_us, "apply", apply_tables))
    for mask, mode, tables in periods:
        if mask.all():  # one period only (a request, most blocks): no split
            return history.history_arrays(df, tables, mode)
    out: dict[str, np.ndarray] = {}
    for mask, mode, tables in periods:  # the periods partition the rows: each row's values from its own
        if mask.any():
            for name, values in history.history_arrays(df.filter(pl.Series(mask)), tables, mode).items():
                out.setdefault(name, np.full(len(t), np.nan))[mask] = values
    return out


def test_from(cutoff_us: int, valid_hours: float, test_share: float) -> int:
    """Where the test split starts (µs): the latest ``test_share`` of the held-out hours after the cutoff."""
    return cutoff_us + int((1 - test_share) * valid_hours * 3600 * 1e6)


def join_impressions(batch: pa.Table, ops: list[FeatureOp], origin_us: int, window_hours: int, at: Joins) -> pa.Table:
    """Impression rows + the fitted impression ops (``features/impression_ops.py``) → the impression feature table.

    Pure: the Ray executor maps it over blocks (its ops holding the broadcast tables, or none where the rows
    already carry an op's columns: a group joined partition against partition, posts met by a hash join), the
    in-process executor calls it on the whole table, serving on a request's rows. Rows from ``at.cutoff_us`` are
    "valid", from ``at.test_from_us`` (None: never) "test"; valid rows read the apply (training total) tables,
    test rows the recent ones (``History.extend``).
    """
    side = first(ops, PostSide)
    df = prepare(batch, origin_us, window_hours, side.topics if side else None, at.topics_extra)
    split = pl.when(pl.col("t_us") >= at.cutoff_us).then(pl.lit("valid")).otherwise(pl.lit("train"))
    if at.test_from_us is not None:
        split = pl.when(pl.col("t_us") >= at.test_from_us).then(pl.lit("test")).otherwise(split)
    own = df.select("user_id", "post_id", "creator_id", "impression_at", split.alias("split"),
                    *[pl.col(f"y_{e}") for e in ENGAGEMENTS], pl.col("follows_creator").cast(pl.Float32))
    return pl.concat([own, *[op.transform(df, at) for op in ops]], how="horizontal").to_arrow()


def impression_arrays(batch: pa.Table, ops: list[FeatureOp], origin_us: int, window_hours: int,
                      at: Joins) -> dict[str, np.ndarray]:
    """``join_impressions``' numeric columns as numpy (NaN: null) — what the models read — without a frame.

    Serving's form of the same ops: the history, graph and account ops' ``transform`` is their ``arrays`` as a
    frame (one computation); the post side's ``arrays`` is a lookup of its own, and ``tests/test_run_api.py``
    holds the scores of both forms bit-identical (and the served rows to the evaluated ones). Through frames a
    request's impression features took 9.4 ms, most of it building ~40 one-row Series and converting the joined
    frame to Arrow (2026-12-07)."""
    side = first(ops, PostSide)
    df = prepare(batch, origin_us, window_hours, side.topics if side else None, at.topics_extra)
    out = {"follows_creator": df.get_column("follows_creator").cast(pl.Float32).to_numpy()}
    for op in ops:
        out.update(op.arrays(df, at))
    return out


def features_in_process(interactions: pa.Table, post_table: pl.DataFrame, users: pl.DataFrame,
                        valid_hours: float, window_hours: int, history_mode: str, jaccard_k: int = 20,
                        seed: int = 0, *, test_share: float,
                        leiden_max_edges: int | None = LEIDEN_MAX_EDGES, community_folds: int = COMMUNITY_FOLDS) -> pa.Table:
    """The in-process executor: the whole impression feature table from one polars frame.

    The same ops the Ray executor fits per block and partition (``pipeline/partitioned.py``), each fit here on
    the whole frame (``ops.fit_in_process``). What the benchmark's single-process baseline runs, and the
    reference the Ray executor's tables are tested against.
    """
    from engagesim.features.post_ops import user_attributes

    topics = topics_of(post_table)
    t = pl.from_arrow(interactions.select(["impression_at"]))["impression_at"].dt.epoch("us")
    origin_us, cutoff_us = int(t.min()), int(t.max()) - int(valid_hours * 3600 * 1e6)
    df = with_topic(history.with_labels_and_windows(pl.from_arrow(interactions), origin_us, window_hours), topics)
    train = df.filter(pl.col("t_us") < cutoff_us)
    posts = impression_post_columns(post_table)
    ops = impression_ops(history.groups_for(train), history_mode, jaccard_k, seed, user_attributes(users), posts,
                         topics, posts.columns, leiden_max_edges, community_folds)
    fit_in_process(ops, train)
    test_from_us = test_from(cutoff_us, valid_hours, test_share)
    held_out = [df.filter((pl.col("t_us") >= lo) & (pl.col("t_us") < hi))
                for lo, hi in ((cutoff_us, test_from_us), (test_from_us, 2**62))]
    for op in ops:
        if isinstance(op, History):
            op.extend(*(op.fit_partial(events) for events in held_out))
    return join_impressions(interactions, ops, origin_us, window_hours,
                            Joins(cutoff_us, history_mode, test_from_us=test_from_us))

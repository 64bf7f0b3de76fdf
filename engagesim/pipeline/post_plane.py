"""Post features as a dataset from read to write: two executors of the same feature ops (``features/ops.py``).

- **Ray** (``run_post_plane``, what ``run_features`` runs): the streamed rows (text statistics, embeddings,
  image statistics) are written once to a scratch dataset. The split and fold keys come from a time
  histogram and the few rows of the buckets holding them. ``fit_on_ray`` runs the state's global ops: a keyed
  op's parts (the target encodings' (column, key, fold) sums) are combined with a hash shuffle, the others'
  (PCA moments, language counts, the bounded k-means sample) folded block by block. Each post then meets its
  impression count (a hash join on post_id), and the posts are featurised in hash partitions of author_id (a
  shuffle): the account-scoped ops ("time since the previous post", author reach) are fit inside each
  partition, on whole accounts. The driver holds histograms, moments, the (key, fold) sums and at most
  ``post_fit.KMEANS_SAMPLE`` embeddings; never a post row.
- **In-process** (``build_post_features``): the same ops on one polars frame. Tests compare the two.

``features.te_mode=past`` needs every earlier post of a key in time order; it runs in process.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim import datasets, io
from engagesim.config import AppConfig
from engagesim.errors import UserError
from engagesim.features import ops as feature_ops
from engagesim.features import post_fit
from engagesim.features.ops import FeatureOp, Rows
from engagesim.features.reach import impressions_per_post
from engagesim.features.state import PostState, Reach
from engagesim.pipeline import partitioned

VECTORS = ("text_emb", "text_sketch", "image_emb")
AUTHOR_PART_ROWS = 100_000  # posts per featurising task (with 384-float embeddings, ~0.2 GB of rows)


def labels_of(df: pl.DataFrame) -> np.ndarray:
    return np.log1p(df["likes"].fill_null(0).to_numpy().astype(np.float64))


def roles_of(df: pl.DataFrame, split: post_fit.PostSplit) -> Rows:
    """A block's rows as the ops' partial fits and leak-free transforms see them."""
    return Rows(df, labels_of(df), split.is_train(df), split.fold(df), df["likes"].is_not_null().to_numpy())


def featurise(state: PostState, df: pl.DataFrame, split: post_fit.PostSplit) -> pl.DataFrame:
    """Rows → post features: the apply version for every row (leak-free target encodings on training rows),
    then the split and the label. Row-aligned with ``df``; any block of whole authors will do."""
    roles = roles_of(df, split)
    return state.transform(df, roles=roles).with_columns(
        pl.Series("split", split.labels(df)),
        pl.Series("label_log1p_likes", np.where(df["likes"].is_null().to_numpy(), np.nan, roles.y)),
    )


def post_info(split: post_fit.PostSplit, state: PostState, counts: dict[str, int]) -> dict[str, Any]:
    info: dict[str, Any] = {"rows": split.rows, "train_rows": split.train_rows,
                            "valid_rows": split.rows - split.train_rows - split.test_rows,
                            "test_rows": split.test_rows}
    if state.te_scalar:
        info["te_smoothing"] = {key: round(s.smoothing, 3) for key, s in {**state.te_scalar, **state.te_list}.items()}
    info.update({f"{k}_pca": {"components": int(p.components.shape[0]), "explained_variance": p.explained_variance}
                 for k, p in state.projections.items()})
    return info | counts


def _media_counts(df: pl.DataFrame) -> dict[str, int]:
    out = {}
    if "image_error" in df.columns:
        out["image_errors"] = int(df["image_error"].is_not_null().sum())
        out["images_embedded_now"] = int(df["image_emb_computed"].sum())
    if "text_emb_computed" in df.columns:
        out["texts_embedded_now"] = int(df["text_emb_computed"].sum())
    return out


def build_post_features(cfg: AppConfig, rows: pa.Table, users: pl.DataFrame | None,
                        impressions: tuple[pl.DataFrame, int] | None = None) -> tuple[pl.DataFrame, dict, PostState]:
    """The in-process executor: fit the post state's ops on the training split (the whole frame as one block),
    featurise every row with it. Validation rows are thus featurised exactly as a new post is at scoring time."""
    f = cfg.features
    df = pl.from_arrow(rows).sort("created_at", "post_id")
    split = post_fit.PostSplit.of_frame(df, f.valid_fraction, f.test_share, f.te_folds)
    has_likes = df["likes"].null_count() < df.height
    fit_df, cutoff_us = df, None
    if impressions is not None:  # author reach's partial fit reads each post's impression count
        counts, cutoff_us = impressions
        per_post = counts.group_by("post_id").agg(pl.col("impressions").sum())
        fit_df = df.join(per_post, on="post_id", how="left", maintain_order="left")
    roles = roles_of(fit_df, split)
    state = PostState.fit(fit_df, roles.y, roles.train, users, post_fit.PostOptions.of(cfg), has_likes, roles.fold,
                          cutoff_us)
    table = featurise(state, df, split)
    return table, post_info(split, state, _media_counts(df)), state


# --- the Ray executor --------------------------------------------------------------------------

COUNTS = ("likes", "image_errors", "images_embedded_now", "texts_embedded_now")


def _histogram(batch: pa.Table, lo: int, width: int) -> dict[str, np.ndarray]:
    """One block → its time histogram and the counts the stage reports (one pass for both)."""
    df = datasets.frame(batch)
    counts = {"likes": int(df["likes"].is_not_null().sum()), **_media_counts(df)}
    return {"hist": post_fit.time_histogram(df, lo, width)[None],
            **{k: np.array([counts.get(k, 0)]) for k in COUNTS}}


def _bucket_rows(batch: pa.Table, lo: int, width: int, buckets: list[int]) -> pa.Table:
    return post_fit.bucket_rows(datasets.frame(batch), lo, width, buckets).to_arrow()


def _keyed_partial(batch: pa.Table, op: FeatureOp, split: post_fit.PostSplit) -> pa.Table:
    return op.fit_partial(roles_of(datasets.frame(batch), split)).to_arrow()


def _folded_partials(batch: pa.Table, ops: list[FeatureOp], split: post_fit.PostSplit) -> pa.Table:
    """One block → one row: each folded op's part as bytes, a column per op."""
    rows = roles_of(datasets.frame(batch), split)
    return pa.table({op.name: pa.array([feature_ops.pack(op.fit_partial(rows))], pa.binary()) for op in ops})


def fit_on_ray(state: PostState, ds, split: post_fit.PostSplit, partitions: int) -> dict[str, int]:
    """The Ray executor's fit of the state's global ops: a keyed op's parts summed by key through a hash shuffle,
    the others' parts folded one block at a time in the driver (never a post row there). Returns the keyed
    ops' combined row counts."""
    fitting = [op for op in state.ops if op.fits and op.scope == "global"]
    sizes = {}
    for op in (op for op in fitting if op.keys):
        summed = (ds.map_batches(_keyed_partial, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs={"op": op, "split": split})
                  .groupby(list(op.keys), num_partitions=partitions).sum(list(op.sums)))
        table = pl.from_arrow(datasets.collect(summed)).rename({f"sum({c})": c for c in op.sums})
        op.combine([table])
        sizes[op.name] = table.height
    folded = [op for op in fitting if not op.keys]
    parts = ds.map_batches(_folded_partials, batch_format="pyarrow", batch_size=None,
                           fn_kwargs={"ops": folded, "split": split}).materialize()
    for op in folded:  # one column at a time: an image block's moments are 13 MB a part
        op.combine(feature_ops.unpacked(
            payload for batch in parts.select_columns([op.name]).iter_batches(batch_size=1, batch_format="pyarrow")
            for payload in batch.column(0).to_pylist()))
    return sizes


def _featurise_group(group: pa.Table, refs: Any) -> pa.Table:
    """One partition of whole authors' posts (joined to their impression counts) → their feature rows. The
    account-scoped ops (time since the previous post, author reach) are fit here, on these accounts' posts."""
    ctx = datasets.fetched(refs)
    df = datasets.frame(group).drop(partitioned.PART)
    split = ctx["split"]
    roles = roles_of(df, split)
    ops = []
    for op in ctx["state"].ops:
        if op.scope == "author":
            op = copy.copy(op)
            op.combine([op.fit_partial(roles)])
        ops.append(op)
    return featurise(PostState(ops), df.drop("impressions", strict=False), split).to_arrow()


def _split_keys(ds, scratch: str, cfg: AppConfig) -> tuple[post_fit.PostSplit, dict[str, int]]:
    """The exact (t, post_id) at the split's ranks — a histogram pass (with the stage's counts), then the
    rows of the few buckets holding them — and those counts. The time range comes from the Parquet footers."""
    n, first, last = io.column_range(scratch, "created_at", cfg.storage)
    lo, hi = datasets.epoch_us(first), datasets.epoch_us(last)
    width = max((hi - lo) // post_fit.HIST_BINS + 1, 1)
    totals = _sum_rows(ds.map_batches(_histogram, batch_format="pyarrow", batch_size=None,
                                      fn_kwargs={"lo": lo, "width": width}))
    f = cfg.features
    ranks = post_fit.PostSplit.ranks(n, f.valid_fraction, f.test_share, f.te_folds)
    where = post_fit.locate(totals["hist"], [ranks[0], ranks[1], *ranks[2]])
    rows = pl.from_arrow(datasets.collect(ds.map_batches(
        _bucket_rows, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"lo": lo, "width": width, "buckets": sorted({b for b, _ in where.values()})})))
    split = post_fit.PostSplit.from_keys(n, ranks, post_fit.keys_in_buckets(rows, where))
    return split, {k: int(totals[k]) for k in COUNTS}


def _sum_rows(parts) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for part in parts.iter_batches(batch_size=1, batch_format="numpy"):
        for k, v in part.items():
            total[k] = v[0] if k not in total else total[k] + v[0]
    return total


def run_post_plane(cfg: AppConfig, rows_ds, scratch: str, out_uri: str, state_uri: str, users: pl.DataFrame | None,
                   interactions, cutoff_us: int | None, log: Callable[[str], None]) -> tuple[dict, PostState]:
    """Streamed post rows (a Ray Dataset) → ``out_uri`` (post features) and the fitted state in ``state_uri``."""
    import ray

    f = cfg.features
    datasets.write_streaming(rows_ds, scratch, "post_rows", cfg.storage)
    ds = datasets.read(scratch, cfg.storage, f.blocks)
    if not io.read_manifest(scratch, cfg.storage).get("rows"):
        raise UserError("no posts to featurise: the posts dataset is empty (did its ingest reject every row? "
                        "see its _rejects)")
    split, counts_info = _split_keys(ds, scratch, cfg)
    has_likes = counts_info.pop("likes") > 0
    schema = ds.schema()
    state = PostState.build(post_fit.PostOptions.of(cfg), users, has_likes, split.train_rows, cutoff_us)
    sizes = fit_on_ray(state, ds, split, f.blocks)
    log(f"post state fit: {split.rows:,} posts" + "".join(f", {n:,} {name} sums" for name, n in sizes.items()))

    posts = ds
    counts = None
    if cutoff_us is not None:
        counts = (interactions.map_batches(impressions_per_post, batch_format="pyarrow", batch_size=None,
                                           fn_kwargs={"cutoff_us": cutoff_us})
                  .groupby("post_id", num_partitions=f.blocks).sum("impressions")
                  .rename_columns({"sum(impressions)": "impressions"}).materialize())
        posts = ds.join(counts, "left_outer", num_partitions=f.blocks, on=("post_id",))
    refs = {"state": ray.put(state), "split": ray.put(split)}
    # Whole authors per task: a hash partition of author_id, not one UDF call per author (5,000 authors at
    # 100k posts cost ~10 ms each that way).
    parts = max(f.blocks, split.rows // AUTHOR_PART_ROWS)
    keyed = posts.map_batches(partitioned._with_part, batch_format="pyarrow", fn_kwargs={"key": "author_id",
                                                                                         "parts": parts})
    featured = keyed.groupby(partitioned.PART, num_partitions=parts).map_groups(
        _featurise_group, batch_format="pyarrow", fn_kwargs={"refs": refs})
    info = post_info(split, state, {k: v for k, v in counts_info.items() if _has_source(schema.names, k)})
    datasets.write_streaming(featured, out_uri, "post_features", cfg.storage, info)
    _save_keyed_state(cfg, out_uri, state_uri, counts, cutoff_us)
    state.saved_parts = ["known_posts", *(["reach_exposed"] if counts is not None else [])]
    state.save(state_uri, cfg.storage)
    io.remove_tree(scratch, cfg.storage)
    return info, state


def _has_source(columns: list[str], count: str) -> bool:
    """Whether the rows carry what a media count is counted from (as ``_media_counts`` reports it)."""
    return ("image_error" in columns) if count.startswith("image") else ("text_emb_computed" in columns)


def _exposed(batch: pa.Table, cutoff_us: int, exposure_hours: float) -> pa.Table:
    return Reach(cutoff_us, exposure_hours).exposed(datasets.frame(batch)).to_arrow()


def _save_keyed_state(cfg: AppConfig, out_uri: str, state_uri: str, counts, cutoff_us: int | None) -> None:
    """The state's per-post tables (known posts; exposed posts for author reach) written as parts by Ray Data."""
    f = cfg.features
    known = datasets.read(out_uri, cfg.storage).select_columns(["post_id", "author_id", "created_at"])
    datasets.write_streaming(known, io.join(state_uri, "known_posts"), "known_posts", cfg.storage)
    if counts is not None:
        exposed = known.join(counts, "left_outer", num_partitions=f.blocks, on=("post_id",)).map_batches(
            _exposed, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"cutoff_us": cutoff_us, "exposure_hours": f.reach_exposure_hours})
        datasets.write_streaming(exposed, io.join(state_uri, "reach_exposed"), "reach_exposed", cfg.storage)


def impression_side(cfg: AppConfig, out_uri: str) -> pl.DataFrame:
    """The post columns the impression stage joins (everything but the raw vectors), read from the written
    post features. Still gathered in the driver: the impression join broadcasts it (the next step is a hash
    join of impressions on post_id)."""
    schema = io.dataset_schema(out_uri, cfg.storage)
    return pl.from_arrow(io.read_table(out_uri, cfg.storage, columns=[c for c in schema.names if c not in VECTORS]))

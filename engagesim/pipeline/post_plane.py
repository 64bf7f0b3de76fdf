"""Post features as a dataset from read to write: two executors of the same partial fits.

- **Ray** (``run_post_plane``, what ``run_features`` runs): the streamed rows (text statistics, embeddings,
  image statistics) are written once to a scratch dataset. The split and fold keys come from a time
  histogram and the few rows of the buckets holding them; the target-encoding sums are combined by
  (column, key, fold) with a hash shuffle; PCA comes from summed moments and k-means from a bounded
  sample. Each post then meets its impression count (a hash join on post_id), and the posts are
  featurised in hash partitions of author_id (a shuffle: "time since the previous post" and author reach
  only look at the same author's posts). The driver holds histograms, moments, the (key, fold) sums and
  at most ``post_fit.KMEANS_SAMPLE`` embeddings; never a post row.
- **In-process** (``build_post_features``): the same functions on one polars frame. Tests compare the two.

``features.te_mode=past`` needs every earlier post of a key in time order; it runs in process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim import datasets, io
from engagesim.config import AppConfig
from engagesim.errors import UserError
from engagesim.features import encodings, post_fit
from engagesim.features.reach import AuthorReach, impressions_per_post
from engagesim.features.state import EMBEDDING_BLOCKS, PostState, block_matrix
from engagesim.pipeline import partitioned

VECTORS = ("text_emb", "text_sketch", "image_emb")
AUTHOR_PART_ROWS = 100_000  # posts per featurising task (with 384-float embeddings, ~0.2 GB of rows)


def labels_of(df: pl.DataFrame) -> np.ndarray:
    return np.log1p(df["likes"].fill_null(0).to_numpy().astype(np.float64))


def featurise(state: PostState, df: pl.DataFrame, split: post_fit.PostSplit, cfg: AppConfig,
              has_likes: bool) -> pl.DataFrame:
    """Rows → post features: the apply version for every row, out-of-fold target encodings on training
    rows, then the split and the label. Row-aligned with ``df``; any block of whole authors will do."""
    y, train, fold = labels_of(df), split.is_train(df), split.fold(df)
    table = state.transform(df)
    if has_likes and train.any():
        if cfg.features.te_mode == "oof":
            oof = post_fit.oof_encodings(df, train, fold, state.tables, cfg.features.te_folds, state.prior)
        else:
            oof = _past_encodings(df, y, train, state)
        replaced = []
        for c in oof.columns:
            values = table[c].to_numpy().astype(np.float32)  # a copy: the apply version for every row
            values[train] = oof[c].to_numpy()
            replaced.append(pl.Series(c, values))
        table = table.with_columns(replaced)
    return table.with_columns(
        pl.Series("split", split.labels(df)),
        pl.Series("label_log1p_likes", np.where(df["likes"].is_null().to_numpy(), np.nan, y)),
    )


def _past_encodings(df: pl.DataFrame, y: np.ndarray, train: np.ndarray, state: PostState) -> pl.DataFrame:
    """``te_mode=past``: each training row sees only strictly earlier rows of its key (in process only)."""
    tr = np.flatnonzero(train)
    y, times = y[tr], df["created_at"].dt.epoch("us").to_numpy()[tr]
    stats = {**state.te_scalar, **state.te_list}
    return post_fit.te_columns(df[tr], state.prior, lambda column, rows, keys: encodings.target_encode_train(
        keys, y[rows], times[rows], "past", smoothing=stats[column].smoothing, with_counts=True),
        state.hier_smoothing)


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
    """The in-process executor: fit the post state on the training split, featurise every row with it.
    Validation rows are thus featurised exactly as a new post is at scoring time."""
    f = cfg.features
    df = pl.from_arrow(rows).sort("created_at", "post_id")
    split = post_fit.PostSplit.of_frame(df, f.valid_fraction, f.test_share, f.te_folds)
    train = split.is_train(df)
    has_likes = df["likes"].null_count() < df.height
    reach = None
    if impressions is not None:
        counts, cutoff_us = impressions
        reach = AuthorReach.fit(df.select("post_id", "author_id", "created_at"), counts, cutoff_us,
                                f.reach_exposure_hours)
    state = PostState.fit(df, labels_of(df), train, users, post_fit.PostOptions.of(cfg), has_likes, reach,
                          split.fold(df))
    table = featurise(state, df, split, cfg, has_likes)
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


def _te_partial(batch: pa.Table, split: post_fit.PostSplit) -> pa.Table:
    df = datasets.frame(batch)
    return post_fit.te_partial(df, labels_of(df), split.is_train(df), split.fold(df),
                               df["likes"].is_not_null().to_numpy()).to_arrow()


def _fit_partial(batch: pa.Table, split: post_fit.PostSplit, columns: list[str], fraction: float) -> pa.Table:
    """One block → one row: Σy and the training count, each embedding block's moments, and its k-means
    sample rows (Arrow IPC). What ``run_post_plane`` sums; the target-encoding sums go through a shuffle."""
    df = datasets.frame(batch)
    train = split.is_train(df)
    out: dict[str, list] = {"y": [[float(labels_of(df)[train].sum()), float(train.sum())]]}
    for column in columns:
        m = post_fit.moments_partial(block_matrix(df, column)[train & df[column].is_not_null().to_numpy()])
        out.update({f"{column}:{k}": [v.astype("<f8").tobytes()] for k, v in m.items()})  # d×d: bytes, not lists
    sample = b""
    if "text_emb" in columns:
        sample = partitioned._ipc(df.filter(pl.Series(train & post_fit.in_kmeans_sample(df, fraction)))
                                  .select("post_id", "text_emb"))
    out["sample"] = [sample]
    return pa.table(out)


def _sum_fits(parts, columns: list[str], dims: dict[str, int]) -> tuple[np.ndarray, dict, pl.DataFrame | None]:
    """The blocks' ``_fit_partial`` rows, added up one at a time: (Σy, n), moments per column, the sample."""
    y = np.zeros(2)
    moments = {c: {"n": np.zeros(1), "sum": np.zeros(dims[c]), "outer": np.zeros((dims[c], dims[c]))} for c in columns}
    samples = []
    for part in parts.iter_batches(batch_size=1, batch_format="pyarrow"):
        y += np.asarray(part.column("y")[0].as_py())
        for c in columns:
            for k, total in moments[c].items():
                total += np.frombuffer(part.column(f"{c}:{k}")[0].as_py(), "<f8").reshape(total.shape)
        payload = part.column("sample")[0].as_py()
        if payload:
            samples.append(partitioned._from_ipc(payload))
    return y, moments, pl.concat(samples) if samples else None


def _featurise_group(group: pa.Table, refs: Any, cfg: AppConfig, has_likes: bool, cutoff_us: int | None) -> pa.Table:
    """One partition of whole authors' posts (joined to their impression counts) → their feature rows."""
    ctx = datasets.fetched(refs)
    df = datasets.frame(group).drop(partitioned.PART)
    known = df.select("post_id", "author_id", "created_at")
    reach = None
    if cutoff_us is not None:
        counts = df.select("post_id", pl.col("impressions").fill_null(0))
        reach = AuthorReach.fit(known, counts, cutoff_us, cfg.features.reach_exposure_hours)
        df = df.drop("impressions")
    state = dataclasses.replace(ctx["state"], known_posts=known, reach=reach)
    return featurise(state, df, ctx["split"], cfg, has_likes).to_arrow()


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
    te = pl.from_arrow(datasets.collect(ds.map_batches(_te_partial, batch_format="pyarrow", batch_size=None,
                                                       fn_kwargs={"split": split})
                                        .groupby(["column", "key", "fold"], num_partitions=f.blocks)
                                        .sum(["s", "ss", "c"])))
    te = te.rename({"sum(s)": "s", "sum(ss)": "ss", "sum(c)": "c"}).with_columns(pl.col("fold").cast(pl.Int32))
    schema = ds.schema()
    blocks = [(c, p) for c, p in EMBEDDING_BLOCKS if c in schema.names]
    dims = {c: schema.base_schema.field(c).type.list_size for c, _ in blocks}
    fraction = post_fit.KMEANS_SAMPLE / max(split.train_rows, 1)
    y, m, sample = _sum_fits(ds.map_batches(_fit_partial, batch_format="pyarrow", batch_size=None,
                                            fn_kwargs={"split": split, "columns": list(dims), "fraction": fraction}),
                             list(dims), dims)
    prior = float(y[0] / y[1]) if has_likes and y[1] else 0.0
    fit = post_fit.PostFit(te, has_likes, prior, {p: m[c] for c, p in blocks}, sample)
    state = PostState.from_parts(fit, post_fit.PostOptions.of(cfg), users)
    log(f"post state fit: {split.rows:,} posts, {te.height:,} (key, fold) sums")

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
        _featurise_group, batch_format="pyarrow",
        fn_kwargs={"refs": refs, "cfg": cfg, "has_likes": has_likes, "cutoff_us": cutoff_us})
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
    df = datasets.frame(batch)
    counts = df.select("post_id", pl.col("impressions").fill_null(0))
    return AuthorReach.fit(df.select("post_id", "author_id", "created_at"), counts, cutoff_us,
                           exposure_hours).exposed.to_arrow()


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

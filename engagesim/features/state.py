"""Fitted feature state: what the batch pipeline learned, saved so any row can be featurised later.

Training fits target-encoding statistics, the language vocabulary, PCA bases,
text clusters, history tables and the interaction graph. Scoring a new post
(``engagesim score``, Ray Serve, ``load_run().predict``) must apply *exactly*
those, through *exactly* the code that produced the validation features —
otherwise served predictions drift from evaluated ones (training/serving skew).
So the pipeline featurises its validation rows with ``transform_posts`` from
the state it is about to save, and the serving paths load that state and call
the same function.

Saved in safe formats only: Parquet tables, safetensors arrays, JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from safetensors.numpy import load as load_arrays

from engagesim import io
from engagesim.features import encodings, post_fit
from engagesim.features.image_stats import IMAGE_STAT_COLUMNS
from engagesim.features.lookup import contains, indexed, left_lookup
from engagesim.features.post import MEDIA_COLUMNS
from engagesim.features.post_fit import LIST_SUMMARY, TE_LIST, TE_SCALAR  # noqa: F401 (re-exported)
from engagesim.features.reach import AuthorReach
from engagesim.features.temporal import earlier_posts, temporal_features
from engagesim.features.text import TEXT_STAT_COLUMNS
from engagesim.io import read_parquet, safe_bytes, write_parquet

Snapshot = Literal["latest", "cutoff"]  # which label-derived state a loaded run serves (PostState.load)

EMBEDDING_BLOCKS = (("text_emb", "text"), ("text_sketch", "sketch"), ("image_emb", "image"))
AUTHOR_ATTRIBUTES = ("follower_count", "following_count", "follower_ratio", "verified")


def user_attributes(users: pl.DataFrame) -> pl.DataFrame:
    """The account attributes both levels use (ratio precomputed, creation time for account age)."""
    return users.select(
        "user_id",
        pl.col("follower_count").cast(pl.Float32),
        pl.col("following_count").cast(pl.Float32),
        (pl.col("follower_count") / (pl.col("following_count") + 1)).cast(pl.Float32).alias("follower_ratio"),
        pl.col("verified").cast(pl.Float32),
        pl.col("created_at").alias("_user_created"),
    )


def fixed_list_matrix(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list array as a float32 matrix; null rows become zeros."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    width = arr.type.list_size
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([0.0] * width, type=arr.type))
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)


def block_matrix(df: pl.DataFrame, column: str) -> np.ndarray:
    return fixed_list_matrix(df[column].to_arrow())


@dataclass
class Projection:
    """A PCA basis applied as (x - mean) @ components.T — the same arithmetic for fit rows and new rows."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: float

    @classmethod
    def fit(cls, x: np.ndarray, k: int) -> Projection:
        return cls.from_moments(post_fit.moments_partial(x), k)

    @classmethod
    def from_moments(cls, m: dict[str, np.ndarray], k: int) -> Projection:
        """The top-k eigenvectors of the covariance from n, Σx and Σxxᵀ (summed over blocks). Each
        component's sign makes its largest-magnitude loading positive, so every executor agrees."""
        n = float(m["n"][0])
        mean = m["sum"] / n
        cov = (m["outer"] - n * np.outer(mean, mean)) / max(n - 1, 1)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1]
        k = max(1, min(k, cov.shape[0], int(n) - 1))
        comps = vectors[:, order[:k]].T
        comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]
        total = float(np.clip(values, 0, None).sum())
        return cls(mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32),
                   float(np.clip(values[order[:k]], 0, None).sum() / total) if total > 0 else 0.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """In float64, then rounded once: a float32 product of 1,280-wide rows differed by up to 4e-6 (several
        float32 steps at |value| ~10) between the Ray plane's blocks and one in-process matrix, since BLAS
        sums in another order for another batch shape; float64's order error is far below one float32 step."""
        x = np.asarray(x, np.float64)
        return ((x - self.mean.astype(np.float64)) @ self.components.T.astype(np.float64)).astype(np.float32)


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1, keepdims=True) - 2 * x @ centres.T + (centres * centres).sum(1)
    return d.argmin(1).astype(np.int32)


@dataclass
class PostState:
    """Everything post-level features need beyond the row itself."""

    te_scalar: dict[str, encodings.TargetStats] = field(default_factory=dict)
    te_list: dict[str, encodings.TargetStats] = field(default_factory=dict)
    prior: float = 0.0
    top_langs: list[str] = field(default_factory=list)
    projections: dict[str, Projection] = field(default_factory=dict)
    centres: np.ndarray | None = None
    authors: pl.DataFrame | None = None  # author attributes (user_attributes, keyed by author_id)
    known_posts: pl.DataFrame | None = None  # post_id, author_id, created_at: for "time since previous post"
    reach: AuthorReach | None = None  # impressions of authors' posts, when the run has an interaction log
    tables: post_fit.TargetTables | None = None  # the fit's (key, fold) sums: out-of-fold values, not saved
    # The target encodings over every labelled row (post_fit.latest_stats): the snapshot a loaded run serves
    # by default; te_scalar / te_list end at the training cutoff (what validation and test rows were given).
    latest: dict[str, encodings.TargetStats] = field(default_factory=dict)
    # Accounts towards their company (post_fit.hierarchical); None in runs saved before it, which then make no
    # te_author_id_hier column, so their account-mean member keeps serving what was evaluated.
    hier_smoothing: float | None = None
    saved_parts: list[str] = field(default_factory=list)  # per-post tables already written as parts (Ray executor)

    # -- fit ------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, df: pl.DataFrame, y: np.ndarray, train: np.ndarray, users: pl.DataFrame | None,
            options: post_fit.PostOptions, has_likes: bool, reach: AuthorReach | None = None,
            fold: np.ndarray | None = None) -> PostState:
        """The in-process executor: every partial fit on the whole frame as one block."""
        fold = np.zeros(df.height, np.int64) if fold is None else fold
        moments = {prefix: post_fit.moments_partial(block_matrix(df, column)[train & df[column].is_not_null().to_numpy()])
                   for column, prefix in EMBEDDING_BLOCKS if column in df.columns}
        sample = None
        if "text_emb" in df.columns:
            fraction = post_fit.KMEANS_SAMPLE / max(int(train.sum()), 1)
            sample = df.filter(pl.Series(train & post_fit.in_kmeans_sample(df, fraction))).select("post_id", "text_emb")
        prior = float(y[train].mean()) if has_likes and train.any() else 0.0
        labelled = df["likes"].is_not_null().to_numpy() if "likes" in df.columns else np.zeros(df.height, bool)
        fit = post_fit.PostFit(post_fit.te_partial(df, y, train, fold, labelled), has_likes, prior, moments, sample)
        return cls.from_parts(fit, options, users, df.select("post_id", "author_id", "created_at"), reach)

    @classmethod
    def from_parts(cls, fit: post_fit.PostFit, options: post_fit.PostOptions, users: pl.DataFrame | None,
                   known_posts: pl.DataFrame | None = None, reach: AuthorReach | None = None) -> PostState:
        """Finalize the combined partial fits (both executors end here)."""
        state = cls(reach=reach, prior=fit.prior, known_posts=known_posts)
        if fit.has_likes:
            state.tables = post_fit.TargetTables.fit(post_fit.training_sums(fit.te), options.smoothing)
            state.te_scalar = {k: state.tables.stats[k] for k in TE_SCALAR}
            state.te_list = {k: state.tables.stats[k] for k in TE_LIST}
            state.latest = post_fit.latest_stats(fit.te, state.tables.stats)
            state.hier_smoothing = state.tables.hier_smoothing
        state.top_langs = post_fit.top_languages(post_fit.training_sums(fit.te))
        for prefix, m in fit.moments.items():
            if m["n"][0] >= 2:
                state.projections[prefix] = Projection.from_moments(m, options.pca_components)
        sample = fit.kmeans_sample
        if sample is not None and sample.height >= options.text_clusters:
            from sklearn.cluster import MiniBatchKMeans

            # In post_id order: mini-batches follow row order, which a distributed gather does not keep.
            x = block_matrix(sample.sort("post_id"), "text_emb")
            km = MiniBatchKMeans(n_clusters=options.text_clusters, random_state=0, n_init=3).fit(x)
            state.centres = km.cluster_centers_.astype(np.float32)
        if users is not None:
            state.authors = user_attributes(users).rename({"user_id": "author_id"})
        return state

    # -- apply ----------------------------------------------------------------------------------
    def transform(self, df: pl.DataFrame, new_accounts: pl.DataFrame | None = None) -> pl.DataFrame:
        """Streamed post rows (row-local features, embeddings, image statistics) → post feature table.

        Target encodings here are the *apply* version (training statistics); the pipeline overwrites
        them for training rows with out-of-fold values. ``new_accounts`` (author_id + any attribute
        columns) describe accounts the run never saw (cold start); known accounts keep their snapshot.
        """
        parts = [
            df.select("post_id", "author_id", "username", "created_at", "likes",
                      pl.col("text").fill_null("") if "text" in df.columns else pl.lit("").alias("text")),
            df.select(TEXT_STAT_COLUMNS + MEDIA_COLUMNS),
            temporal_features(df.select("post_id", "author_id", "created_at"), known=self.known_posts,
                              accounts=self._accounts(), earlier=self._earlier()).drop("post_id"),
        ]
        if self.te_scalar:
            parts.append(self._target_encodings(df))
        if self.reach is not None:
            parts.append(self.reach.features(df))
        if self.authors is not None:
            unseen = None  # accounts the snapshot lacks, described by the request (cold start)
            if new_accounts is not None and new_accounts.height:
                known = contains(self.authors, "author_id", new_accounts["author_id"])
                unseen = new_accounts.filter(~known & pl.col("author_id").is_not_null()).unique("author_id", keep="last")
                unseen = pl.concat([self.authors.head(0), unseen], how="diagonal_relaxed").select(self.authors.columns)
            author = left_lookup(df.select("author_id"), self.authors, "author_id", unseen)
            parts.append(author.select(pl.col(c).alias(f"author_{c}") for c in AUTHOR_ATTRIBUTES))
        parts.append(encodings.one_hot(df["language"], self.top_langs, "lang"))
        if "clarity_contrast" in df.columns:
            parts.append(df.select(pl.col(IMAGE_STAT_COLUMNS).cast(pl.Float32)))
            parts.append(pl.DataFrame({"has_image": (df["image_error"].is_null() & df["photo_uri"].is_not_null())
                                       .cast(pl.Float32)}))
        blocks = []
        for column, prefix in EMBEDDING_BLOCKS:
            if column not in df.columns:
                continue
            blocks.append(column)
            if prefix in self.projections:
                comps = self.projections[prefix].apply(block_matrix(df, column))
                parts.append(pl.DataFrame({f"{prefix}_pca_{i}": comps[:, i] for i in range(comps.shape[1])}))
        if self.centres is not None and "text_emb" in df.columns:
            parts.append(pl.DataFrame({"text_cluster": nearest_centre(block_matrix(df, "text_emb"), self.centres)}))
        parts.append(df.select(blocks))
        return pl.concat(parts, how="horizontal")

    def _once(self, name: str, source: pl.DataFrame | None, make) -> pl.DataFrame | None:
        """``make(source)``, kept while ``source`` is the same table (a transform per request reuses it)."""
        kept = self.__dict__.get(name)
        if kept is None or kept[0] is not source:
            kept = self.__dict__[name] = (source, None if source is None else make(source))
        return kept[1]

    def _accounts(self) -> pl.DataFrame | None:
        """author_id, _account_created of the known accounts (account age)."""
        return self._once("_accounts_frame", self.authors, lambda a: a.select(
            "author_id", pl.col("_user_created").alias("_account_created")))

    def _earlier(self) -> pl.DataFrame | None:
        """The known posts sorted for the "previous post" as-of join (None: the batch is its own history)."""
        return self._once("_earlier_frame", self.known_posts, earlier_posts)

    def _target_encodings(self, df: pl.DataFrame) -> pl.DataFrame:
        cols: dict[str, np.ndarray] = {}
        author = None
        for key, stats in self.te_scalar.items():
            values, counts, sums = stats.apply_counted(post_fit.key_rows(df, key)[1])
            cols[f"te_{key}"] = values.astype(np.float32)
            if key in post_fit.TE_COUNTED:
                cols[f"te_{key}_n"] = counts.astype(np.float32)
            if key == "author_id":
                author = (sums, counts)
        for key, stats in self.te_list.items():
            rows, elems = post_fit.key_rows(df, key)
            summary = encodings.list_te_summary(rows, stats.apply(elems), df.height, self.prior)
            for k, name in enumerate(LIST_SUMMARY):
                cols[f"te_{key}_{name}"] = summary[:, k]
        if author is not None and self.hier_smoothing is not None:
            cols["te_author_id_hier"] = post_fit.hierarchical(*author, cols["te_company"], self.hier_smoothing)
        return pl.DataFrame(cols)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, uri: str, storage=None) -> None:
        meta = {"prior": self.prior, "top_langs": self.top_langs, "hier_smoothing": self.hier_smoothing,
                "te": {k: {"key": s.key, "prior": s.prior, "smoothing": s.smoothing} for k, s in
                       {**{f"scalar:{k}": v for k, v in self.te_scalar.items()},
                        **{f"list:{k}": v for k, v in self.te_list.items()}}.items()},
                "te_order": [*(f"scalar:{k}" for k in self.te_scalar), *(f"list:{k}" for k in self.te_list)],
                "projections": {k: p.explained_variance for k, p in self.projections.items()},
                "projection_order": list(self.projections),
                "has_centres": self.centres is not None, "has_authors": self.authors is not None,
                "has_reach": self.reach is not None or "reach_exposed" in self.saved_parts}
        for name, stats in {**{f"scalar:{k}": v for k, v in self.te_scalar.items()},
                            **{f"list:{k}": v for k, v in self.te_list.items()}}.items():
            write_parquet(io.join(uri, f"te_{name.replace(':', '_')}.parquet"), stats.table, storage)
        meta["latest"] = {k: s.prior for k, s in self.latest.items()}
        for key, stats in self.latest.items():
            write_parquet(io.join(uri, "latest", f"te_{key}.parquet"), stats.table, storage)
        arrays = {f"{k}.mean": p.mean for k, p in self.projections.items()}
        arrays.update({f"{k}.components": p.components for k, p in self.projections.items()})
        if self.centres is not None:
            arrays["centres"] = self.centres
        io.write_bytes(io.join(uri, "arrays.safetensors"), safe_bytes(arrays) if arrays else b"", storage)
        if self.authors is not None:
            write_parquet(io.join(uri, "authors.parquet"), self.authors, storage)
        if "known_posts" not in self.saved_parts:
            write_parquet(io.join(uri, "known_posts.parquet"), self.known_posts, storage)
        if self.reach is not None and "reach_exposed" not in self.saved_parts:
            write_parquet(io.join(uri, "reach_exposed.parquet"), self.reach.exposed, storage)
        io.write_json(io.join(uri, "state.json"), meta, storage)

    @classmethod
    def load(cls, uri: str, storage=None, snapshot: Snapshot = "latest") -> PostState:
        """``snapshot``: "latest" serves target encodings over every labelled row; "cutoff" those the
        validation and test rows were featurised with (what the served = evaluated checks compare)."""
        meta = io.read_json(io.join(uri, "state.json"), storage)
        state = cls(prior=meta["prior"], top_langs=meta["top_langs"], hier_smoothing=meta.get("hier_smoothing"))
        latest = meta.get("latest", {}) if snapshot == "latest" else {}
        for name in meta["te_order"]:  # JSON objects may come back re-ordered; column order must not
            m = meta["te"][name]
            kind, key = name.split(":")
            at = io.join(uri, "latest", f"te_{key}.parquet") if key in latest else \
                io.join(uri, f"te_{kind}_{key}.parquet")
            stats = encodings.TargetStats(m["key"], read_parquet(at, storage), latest.get(key, m["prior"]),
                                          m["smoothing"])
            (state.te_scalar if kind == "scalar" else state.te_list)[key] = stats
        raw = io.read_bytes(io.join(uri, "arrays.safetensors"), storage)
        arrays = load_arrays(raw) if raw else {}
        for k in meta["projection_order"]:
            state.projections[k] = Projection(arrays[f"{k}.mean"], arrays[f"{k}.components"], meta["projections"][k])
        state.centres = arrays.get("centres") if meta["has_centres"] else None
        if meta["has_authors"]:
            state.authors = read_parquet(io.join(uri, "authors.parquet"), storage)
        state.known_posts = _table_or_parts(uri, "known_posts", storage)
        if meta.get("has_reach"):
            state.reach = AuthorReach(_table_or_parts(uri, "reach_exposed", storage))
        return state

    def index_for_lookups(self) -> None:
        """Serving (a loaded run): its fitted tables answer a few keys by index, not by a join per call."""
        for stats in (*self.te_scalar.values(), *self.te_list.values()):
            indexed(stats.table, stats.key)
        indexed(self.authors, "author_id")
        indexed(self._accounts(), "author_id")
        self._earlier()
        if self.reach is not None:
            self.reach.index_for_lookups()


def _table_or_parts(uri: str, name: str, storage=None) -> pl.DataFrame:
    """``<name>.parquet`` (in-process executor) or the committed dataset ``<name>/`` (Ray executor), read whole."""
    single = io.join(uri, f"{name}.parquet")
    if io.exists(single, storage):
        return read_parquet(single, storage)
    fs, _ = io.filesystem(uri, storage)
    import pyarrow.parquet as pq

    return pl.from_arrow(pq.read_table(io.dataset_files(io.join(uri, name), storage), filesystem=fs))


@dataclass
class ImpressionState:
    """The point-in-time snapshot impression features are looked up in: history totals over the
    training events, the graph, account attributes, and the features of every known post."""

    origin_us: int
    cutoff_us: int
    window_hours: int
    apply_tables: dict[str, pl.DataFrame]
    graph: Any  # features.graph.GraphModel; None when the pipeline's graph task saved it into the state
    users: pl.DataFrame
    posts: pl.DataFrame  # post_id + post_<feature> columns, as joined onto impressions
    topics: pl.DataFrame | None = None

    history: list[str] = field(default_factory=list)  # groups whose apply tables are already saved as parts
    saved_parts: list[str] = field(default_factory=list)  # "posts" / "topics" already written as datasets

    def context(self) -> dict:
        """The ``ctx`` that ``join_impressions`` takes for rows that are all past the training data."""
        return {"train_tables": {}, "apply_tables": self.apply_tables, "graph": self.graph, "users": self.users,
                "posts": self.posts, **({"topics": self.topics} if self.topics is not None else {})}

    @staticmethod
    def history_uri(uri: str, prefix: str) -> str:
        """Where a group's apply table lives: Parquet parts, one per key-hash partition (pipeline/partitioned.py)."""
        return io.join(uri, "history", prefix, "apply")

    def save(self, uri: str, storage=None) -> None:
        for prefix, table in self.apply_tables.items():
            write_parquet(io.join(self.history_uri(uri, prefix), "part-00000.parquet"), table, storage)
        write_parquet(io.join(uri, "users.parquet"), self.users, storage)
        if "posts" not in self.saved_parts:
            write_parquet(io.join(uri, "posts.parquet"), self.posts, storage)
        if self.topics is not None and "topics" not in self.saved_parts:
            write_parquet(io.join(uri, "topics.parquet"), self.topics, storage)
        if self.graph is not None:
            self.graph.save(io.join(uri, "graph"), storage)
        io.write_json(io.join(uri, "state.json"), {"origin_us": self.origin_us, "cutoff_us": self.cutoff_us,
                                                    "window_hours": self.window_hours,
                                                    "history": sorted({*self.history, *self.apply_tables}),
                                                    "topics": self.topics is not None or "topics" in self.saved_parts},
                      storage)

    @classmethod
    def load(cls, uri: str, storage=None) -> ImpressionState:
        from engagesim.features.graph import GraphModel

        meta = io.read_json(io.join(uri, "state.json"), storage)
        return cls(meta["origin_us"], meta["cutoff_us"], meta["window_hours"],
                   {p: _history_table(uri, p, storage) for p in meta["history"]},
                   GraphModel.load(io.join(uri, "graph"), storage),
                   read_parquet(io.join(uri, "users.parquet"), storage),
                   _table_or_parts(uri, "posts", storage),
                   _table_or_parts(uri, "topics", storage) if meta["topics"] else None)

    def index_for_lookups(self) -> None:
        """Serving (a loaded run): history, users, posts, topics and graph ids answer a few keys by index."""
        from engagesim.features.history import GROUPS

        for prefix, table in self.apply_tables.items():
            indexed(table, GROUPS[prefix])
        indexed(self.users, "user_id")
        indexed(self.posts, "post_id")
        indexed(self.topics, "post_id")
        if self.graph is not None:
            indexed(self.graph.users.table, "key")
            indexed(self.graph.creators.table, "key")


def _history_table(uri: str, prefix: str, storage=None) -> pl.DataFrame:
    """A group's apply table: its parts, or the single file that runs before the partitioned plane saved."""
    single = io.join(uri, f"history_{prefix}.parquet")
    if io.exists(single, storage):
        return read_parquet(single, storage)
    return read_parts(ImpressionState.history_uri(uri, prefix), storage)


def read_parts(uri: str, storage=None) -> pl.DataFrame:
    """Every Parquet part under ``uri`` as one frame (a partitioned table, read whole)."""
    import pyarrow.parquet as pq

    fs, _ = io.filesystem(uri, storage)
    files = [f for f in io.list_files(uri, storage) if f.endswith(".parquet")]
    return pl.from_arrow(pq.read_table(files, filesystem=fs))

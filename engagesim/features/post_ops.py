"""The post state's ops (features/ops.py), in the order their columns appear in the post feature table.

Each is the partial fit, finalize and apply of one feature family; ``pipeline/post_plane.py`` runs them on the
whole frame (in process) or on Ray Data blocks (the target encodings' (column, key, fold) sums through a hash
shuffle; PCA moments, language counts and the k-means sample folded in the driver; time since the previous post
and author reach inside tasks that hold whole accounts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl

from engagesim import io
from engagesim.features import encodings, post_fit
from engagesim.features.image_stats import IMAGE_STAT_COLUMNS
from engagesim.features.lookup import contains, frame, index_of, indexed, left_lookup, lookup_values
from engagesim.features.ops import Apply, FeatureOp, Provenance, Rows, Snapshot, null_mask, numeric_arrays
from engagesim.features.post import MEDIA_COLUMNS
from engagesim.features.post_fit import LIST_SUMMARY, TE_COUNTED, TE_LIST, TE_SCALAR
from engagesim.features.reach import REACH_COLUMNS, AuthorReach
from engagesim.features.temporal import (
    TEMPORAL_COLUMNS,
    AccountsCreated,
    PreviousPosts,
    earlier_posts,
    few_rows_arrays,
    temporal_features,
)
from engagesim.features.text import FEW_ROWS, TEXT_STAT_COLUMNS
from engagesim.io import read_parquet, write_parquet

EMBEDDING_BLOCKS = (("text_emb", "text"), ("text_sketch", "sketch"), ("image_emb", "image"))
AUTHOR_ATTRIBUTES = ("follower_count", "following_count", "follower_ratio", "verified")
ID_COLUMNS = ["post_id", "author_id", "username", "created_at", "likes", "text"]
NO_LABELS = "no labels"


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


def fixed_list_rows(arr) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list array's non-null rows as a float32 matrix, and which rows those are."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    values = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, arr.type.list_size).astype(np.float32)
    return values, arr.is_valid().to_numpy(zero_copy_only=False)


def fixed_list_matrix(arr) -> np.ndarray:
    """A fixed-size-list array as a float32 matrix; null rows become zeros."""
    values, valid = fixed_list_rows(arr)  # flatten() skips null rows
    if valid.all():
        return values
    # Placed into zeros (pyarrow's fill_null with a list scalar took 267 ms for a 1,000-row batch request whose
    # new posts had no embedding: half the request).
    out = np.zeros((len(valid), values.shape[1]), dtype=np.float32)
    out[valid] = values
    return out


def block_matrix(df: pl.DataFrame, column: str) -> np.ndarray:
    return fixed_list_matrix(df[column].to_arrow())


def valid_block(df: pl.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``block_matrix`` without the zero rows (``fixed_list_rows``), for transforms that give every null row one
    constant answer."""
    return fixed_list_rows(df[column].to_arrow())


def table_or_parts(uri: str, name: str, storage=None) -> pl.DataFrame:
    """``<name>.parquet`` (in-process executor) or the committed dataset ``<name>/`` (Ray executor), read whole."""
    single = io.join(uri, f"{name}.parquet")
    if io.exists(single, storage):
        return read_parquet(single, storage)
    fs, _ = io.filesystem(uri, storage)
    import pyarrow.parquet as pq

    return pl.from_arrow(pq.read_table(io.dataset_files(io.join(uri, name), storage), filesystem=fs))


class RowColumns(FeatureOp):
    """The row's ids and raw label, its text statistics and media counts (computed while the rows streamed)."""

    name, provenance = "row", Provenance("row-local statistics / attributes", NO_LABELS)

    def columns(self) -> list[str]:
        return ID_COLUMNS + TEXT_STAT_COLUMNS + MEDIA_COLUMNS

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame:
        text = pl.col("text").fill_null("") if "text" in df.columns else pl.lit("").alias("text")
        return df.select(*ID_COLUMNS[:-1], text, *TEXT_STAT_COLUMNS, *MEDIA_COLUMNS)

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        return numeric_arrays(df, [*ID_COLUMNS[:-1], *TEXT_STAT_COLUMNS, *MEDIA_COLUMNS])


class Temporal(FeatureOp):
    """Day, hour, month, seconds since the account's previous known post, account age."""

    name, provenance = "temporal", Provenance("Adobe date-time features", "row/account-local: no labels")
    scope, fits = "author", True

    def __init__(self, accounts: pl.DataFrame | None = None, known: pl.DataFrame | None = None):
        self.accounts = accounts  # author_id, _account_created
        self.known = known  # post_id, author_id, created_at: what a "previous post" may be
        self._earlier: pl.DataFrame | None = None
        self._previous: PreviousPosts | None = None  # a loaded run's per-account times (index_for_lookups)
        self._created: AccountsCreated | None = None  # and its accounts' creation times

    def fit_partial(self, rows: Rows) -> pl.DataFrame:
        return rows.df.select("post_id", "author_id", "created_at")

    def combine(self, parts: Iterable[pl.DataFrame]) -> None:
        self.known, self._earlier, self._previous = pl.concat(list(parts)), None, None

    def columns(self) -> list[str]:
        return TEMPORAL_COLUMNS

    def earlier(self) -> pl.DataFrame | None:
        """The known posts sorted for the as-of join, once (a transform per request reuses it)."""
        if self._earlier is None and self.known is not None:
            self._earlier = earlier_posts(self.known)
        return self._earlier

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame:
        return temporal_features(df.select("post_id", "author_id", "created_at"), known=self.known,
                                 accounts=self.accounts, earlier=self.earlier(), previous=self._previous,
                                 created=self._created).drop("post_id")

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        """A served post's columns in plain Python (``temporal.few_rows_arrays``); the frame's otherwise."""
        if (self._previous is not None and df.height <= FEW_ROWS
                and (self._created is not None or self.accounts is None)):
            if (out := few_rows_arrays(df, self._previous, self._created)) is not None:
                return out
        return super().arrays(df, at)

    def save(self, uri, storage, skip):
        if "known_posts" not in skip:
            write_parquet(io.join(uri, "known_posts.parquet"), self.known, storage)
        if self.accounts is not None:
            write_parquet(io.join(uri, "accounts.parquet"), self.accounts, storage)
        return {"has_accounts": self.accounts is not None}, {}

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot):
        accounts = None
        if meta.get("has_accounts"):
            accounts = read_parquet(io.join(uri, "accounts.parquet"), storage)
        elif meta.get("has_authors"):  # states saved before the ops: the accounts' creation times sat in authors
            accounts = read_parquet(io.join(uri, "authors.parquet"), storage).select(
                "author_id", pl.col("_user_created").alias("_account_created"))
        return cls(accounts, table_or_parts(uri, "known_posts", storage))

    def index_for_lookups(self) -> None:
        indexed(self.accounts, "author_id")
        if self.earlier() is not None:
            self._previous = PreviousPosts(self.earlier())
        if self.accounts is not None:
            try:  # the index left_lookup builds on its first request anyway, built now and shared
                self._created = AccountsCreated(self.accounts, index_of(self.accounts, ["author_id"]))
            except ValueError:  # an account twice: the frame path (and its lookup's own check) as before
                self._created = None


@dataclass
class TeSettings:
    smoothing: encodings.Smoothing = "auto"
    mode: str = "oof"  # "oof": out-of-fold over time folds; "past": earlier rows only (in process)
    folds: int = 5


class TargetEncoding(FeatureOp):
    """Smoothed mean log1p(likes) per author, company, language, hashtag and domain, with counts and the
    account → company hierarchy (post_fit.py says why each piece is there)."""

    name = "target_encoding"
    provenance = Provenance("LAYER6 target encoding",
                            "label-derived: out-of-fold (time folds) or past-only on train; train stats on valid")
    keys, sums, fits = ("column", "key", "fold"), ("s", "ss", "c"), True

    def __init__(self, settings: TeSettings | None = None):
        self.settings = settings or TeSettings()
        self.prior = 0.0
        self.te_scalar: dict[str, encodings.TargetStats] = {}
        self.te_list: dict[str, encodings.TargetStats] = {}
        self.tables: post_fit.TargetTables | None = None  # the (key, fold) sums: out-of-fold values, not saved
        # Over every labelled row (post_fit.latest_stats): what a loaded run serves by default; te_scalar / te_list
        # end at the training cutoff (what validation and test rows were given).
        self.latest: dict[str, encodings.TargetStats] = {}
        # None in runs saved before the hierarchy, which then make no te_author_id_hier column.
        self.hier_smoothing: float | None = None

    def fit_partial(self, rows: Rows) -> pl.DataFrame:
        return post_fit.te_partial(rows.df, rows.y, rows.train, rows.fold, rows.labelled)

    def combine(self, parts: Iterable[pl.DataFrame]) -> None:
        te = pl.concat(list(parts))
        self.tables = post_fit.TargetTables.fit(post_fit.training_sums(te), self.settings.smoothing)
        self.te_scalar = {k: self.tables.stats[k] for k in TE_SCALAR}
        self.te_list = {k: self.tables.stats[k] for k in TE_LIST}
        self.latest = post_fit.latest_stats(te, self.tables.stats)
        self.hier_smoothing = self.tables.hier_smoothing
        self.prior = self.tables.stats["author_id"].prior  # every training row has one author key: their mean y

    def columns(self) -> list[str]:
        out = [c for k in self.te_scalar for c in (f"te_{k}", *([f"te_{k}_n"] if k in TE_COUNTED else []))]
        out += [f"te_{k}_{name}" for k in self.te_list for name in LIST_SUMMARY]
        return out + (["te_author_id_hier"] if self.hier_smoothing is not None else [])

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        """The apply values for every row; training rows (``at.roles``) get their out-of-fold or past values."""
        if not self.te_scalar:
            return None
        table = self._apply(df)
        roles = at.roles
        if roles is None or not roles.train.any():
            return table
        if self.settings.mode == "oof":
            leak_free = post_fit.oof_encodings(df, roles.train, roles.fold, self.tables, self.settings.folds,
                                               self.prior)
        else:
            leak_free = self._past(df, roles)
        replaced = []
        for c in leak_free.columns:
            values = table[c].to_numpy().astype(np.float32)  # a copy: the apply version for every row
            values[roles.train] = leak_free[c].to_numpy()
            replaced.append(pl.Series(c, values))
        return table.with_columns(replaced)

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        """The apply values as numpy (a served post's encodings: its keys looked up by index, no frame)."""
        if not self.te_scalar:
            return {}
        if at.roles is not None and at.roles.train.any():
            return super().arrays(df, at)
        return self._apply_arrays(df)

    def _apply(self, df: pl.DataFrame) -> pl.DataFrame:
        return frame(self._apply_arrays(df))

    def _apply_arrays(self, df: pl.DataFrame) -> dict[str, np.ndarray]:
        cols: dict[str, np.ndarray] = {}
        author = None
        for key, stats in self.te_scalar.items():
            values, counts, sums = stats.apply_counted(post_fit.key_rows(df, key, as_list=True)[1])
            cols[f"te_{key}"] = values.astype(np.float32)
            if key in TE_COUNTED:
                cols[f"te_{key}_n"] = counts.astype(np.float32)
            if key == "author_id":
                author = (sums, counts)
        for key, stats in self.te_list.items():
            rows, elems = post_fit.key_rows(df, key, as_list=True)
            summary = encodings.list_te_summary(rows, stats.apply(elems), df.height, self.prior)
            for k, name in enumerate(LIST_SUMMARY):
                cols[f"te_{key}_{name}"] = summary[:, k]
        if author is not None and self.hier_smoothing is not None:
            cols["te_author_id_hier"] = post_fit.hierarchical(*author, cols["te_company"], self.hier_smoothing)
        return cols

    def _past(self, df: pl.DataFrame, roles: Rows) -> pl.DataFrame:
        """``te_mode=past``: each training row sees only strictly earlier rows of its key (in process only)."""
        tr = np.flatnonzero(roles.train)
        y, times = roles.y[tr], df["created_at"].dt.epoch("us").to_numpy()[tr]
        stats = {**self.te_scalar, **self.te_list}
        return post_fit.te_columns(df[tr], self.prior, lambda column, rows, keys: encodings.target_encode_train(
            keys, y[rows], times[rows], "past", smoothing=stats[column].smoothing, with_counts=True),
            self.hier_smoothing)

    def save(self, uri, storage, skip):
        named = {**{f"scalar:{k}": v for k, v in self.te_scalar.items()}, **{f"list:{k}": v for k, v in self.te_list.items()}}
        for name, stats in named.items():
            write_parquet(io.join(uri, f"te_{name.replace(':', '_')}.parquet"), stats.table, storage)
        for key, stats in self.latest.items():
            write_parquet(io.join(uri, "latest", f"te_{key}.parquet"), stats.table, storage)
        return {"prior": self.prior, "hier_smoothing": self.hier_smoothing, "te_order": list(named),
                "te": {k: {"key": s.key, "prior": s.prior, "smoothing": s.smoothing} for k, s in named.items()},
                "latest": {k: s.prior for k, s in self.latest.items()}}, {}

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot: Snapshot):
        """``snapshot``: "latest" serves the encodings over every labelled row; "cutoff" those the validation and
        test rows were featurised with (what the served = evaluated checks compare)."""
        if not meta.get("te_order"):
            return None
        op = cls()
        op.prior, op.hier_smoothing = meta["prior"], meta.get("hier_smoothing")
        latest = meta.get("latest", {}) if snapshot == "latest" else {}
        for name in meta["te_order"]:  # JSON objects may come back re-ordered; column order must not
            m = meta["te"][name]
            kind, key = name.split(":")
            at = io.join(uri, "latest", f"te_{key}.parquet") if key in latest else io.join(uri, f"te_{kind}_{key}.parquet")
            stats = encodings.TargetStats(m["key"], read_parquet(at, storage), latest.get(key, m["prior"]), m["smoothing"])
            (op.te_scalar if kind == "scalar" else op.te_list)[key] = stats
        return op

    def index_for_lookups(self) -> None:
        for stats in (*self.te_scalar.values(), *self.te_list.values()):
            indexed(stats.table, stats.key)


class Reach(FeatureOp):
    """How many impressions the author's other posts drew before the cutoff (features/reach.py)."""

    name = "reach"
    provenance = Provenance("author reach from the interaction log",
                            "exposure-derived: impressions before the cutoff, the post's own left out")
    scope, fits = "author", True

    def __init__(self, cutoff_us: int | None = None, exposure_hours: float = 0.0, reach: AuthorReach | None = None):
        self.cutoff_us, self.exposure_hours, self.reach = cutoff_us, exposure_hours, reach

    def fit_partial(self, rows: Rows) -> pl.DataFrame:
        return self.exposed(rows.df)

    def exposed(self, df: pl.DataFrame) -> pl.DataFrame:
        """A block's exposed posts; its rows carry their impression counts (``impressions``, null = none)."""
        return AuthorReach.fit(df.select("post_id", "author_id", "created_at"),
                               df.select("post_id", pl.col("impressions").fill_null(0)), self.cutoff_us,
                               self.exposure_hours).exposed

    def combine(self, parts: Iterable[pl.DataFrame]) -> None:
        self.reach = AuthorReach(pl.concat(list(parts)))

    def columns(self) -> list[str]:
        return REACH_COLUMNS

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        return None if self.reach is None else self.reach.features(df)

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        return {} if self.reach is None else {c: v.astype(np.float32) for c, v in self.reach.arrays(df).items()}

    def save(self, uri, storage, skip):
        if "reach_exposed" not in skip:
            write_parquet(io.join(uri, "reach_exposed.parquet"), self.reach.exposed, storage)
        return {"has_reach": True}, {}

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot):
        return cls(reach=AuthorReach(table_or_parts(uri, "reach_exposed", storage))) if meta.get("has_reach") else None

    def index_for_lookups(self) -> None:
        self.reach.index_for_lookups()


class AuthorAttributes(FeatureOp):
    """The account's followers, following, their ratio and verified flag (the users table)."""

    name, provenance = "author_attributes", Provenance("account attributes", NO_LABELS)

    def __init__(self, authors: pl.DataFrame):
        self.authors = authors  # user_attributes, keyed by author_id

    @classmethod
    def of(cls, users: pl.DataFrame) -> AuthorAttributes:
        return cls(user_attributes(users).rename({"user_id": "author_id"}))

    def columns(self) -> list[str]:
        return [f"author_{c}" for c in AUTHOR_ATTRIBUTES]

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame:
        """Known accounts keep their snapshot; ``at.new_accounts`` describe accounts the run never saw (cold start)."""
        unseen = None
        new = at.new_accounts
        if new is not None and new.height:
            known = contains(self.authors, "author_id", new["author_id"])
            unseen = new.filter(~known & pl.col("author_id").is_not_null()).unique("author_id", keep="last")
            unseen = pl.concat([self.authors.head(0), unseen], how="diagonal_relaxed").select(self.authors.columns)
        author = left_lookup(df.select("author_id"), self.authors, "author_id", unseen)
        return author.select(pl.col(c).alias(f"author_{c}") for c in AUTHOR_ATTRIBUTES)

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        """Known accounts' attributes by index (``lookup_values``); a request naming new accounts takes the frame."""
        new = at.new_accounts
        if (new is not None and new.height) or df.height > FEW_ROWS or df.get_column("author_id").dtype != pl.String:
            return super().arrays(df, at)
        got = lookup_values(self.authors, "author_id", df.get_column("author_id").to_list(), list(AUTHOR_ATTRIBUTES),
                            dict.fromkeys(AUTHOR_ATTRIBUTES, np.nan))
        return {f"author_{c}": got[c] for c in AUTHOR_ATTRIBUTES}

    def save(self, uri, storage, skip):
        write_parquet(io.join(uri, "authors.parquet"), self.authors, storage)
        return {"has_authors": True}, {}

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot):
        return cls(read_parquet(io.join(uri, "authors.parquet"), storage)) if meta.get("has_authors") else None

    def index_for_lookups(self) -> None:
        indexed(self.authors, "author_id")


class Languages(FeatureOp):
    """One-hot of the training posts' most frequent languages (ties by name, so every executor agrees)."""

    name = "languages"
    provenance = Provenance("row-local statistics / attributes", "no labels (categories from training rows)")
    fits = True

    def __init__(self, top: list[str] | None = None, k: int = 8):
        self.top, self.k = top or [], k

    def fit_partial(self, rows: Rows) -> pl.DataFrame:
        language = post_fit.key_rows(rows.df.filter(pl.Series(rows.train)), "language")[1]
        return pl.DataFrame({"key": language}).group_by("key").agg(pl.len().cast(pl.Float64).alias("c"))

    def combine(self, parts: Iterable[pl.DataFrame]) -> None:
        per = pl.concat(list(parts)).filter(pl.col("key") != "<none>").group_by("key").agg(pl.col("c").sum())
        self.top = per.sort(["c", "key"], descending=[True, False]).head(self.k)["key"].to_list()

    def columns(self) -> list[str]:
        return [f"lang={c}" for c in self.top]

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame:
        return encodings.one_hot(df["language"], self.top, "lang")

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        language = df.get_column("language")
        if df.height > FEW_ROWS or language.dtype != pl.String:
            return super().arrays(df, at)
        given = language.to_list()  # a served post: as one_hot's few-rows path (an unknown or null value: zeros)
        return {f"lang={c}": np.array([v == c for v in given], dtype=np.int8) for c in self.top}

    def save(self, uri, storage, skip):
        return {"top_langs": self.top}, {}

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot):
        return cls(meta["top_langs"])


class ImageStats(FeatureOp):
    """SMP 2019's high-level image statistics (computed while the rows streamed) and whether an image decoded."""

    name, provenance = "image_stats", Provenance("SMP 2019 high-level image features", "row-local: no labels")

    def columns(self) -> list[str]:
        return [*IMAGE_STAT_COLUMNS, "has_image"]

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        if "clarity_contrast" not in df.columns:
            return None
        has_image = (df["image_error"].is_null() & df["photo_uri"].is_not_null()).cast(pl.Float32)
        return df.select(pl.col(IMAGE_STAT_COLUMNS).cast(pl.Float32)).with_columns(has_image.alias("has_image"))

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        if "clarity_contrast" not in df.columns:
            return {}
        out = {c: v.astype(np.float32) for c, v in numeric_arrays(df, IMAGE_STAT_COLUMNS).items()}
        out["has_image"] = (null_mask(df.get_column("image_error")) & ~null_mask(df.get_column("photo_uri"))
                            ).astype(np.float32)
        return out

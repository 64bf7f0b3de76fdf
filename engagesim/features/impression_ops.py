"""The impression-side feature ops (``features/ops.py``'s protocol): engagement history, graph, accounts, posts.

``ImpressionState`` is an ordered list of these; an impression feature row is the row's own columns, then each
op's columns in that order (``features.impression.join_impressions`` is the loop):

- ``History(prefix)``, one per group (user, creator, pair, post, topic): keyed on the group's key × window, with
  sums (impressions, engagements) and maxima (last engagement time). The in-process executor fits it with
  ``ops.fit_in_process``; the Ray executor (``pipeline/partitioned.py``) fits every group in one pass over the log
  and combines each key-hash partition in its own task, so the fitted tables exist only as Parquet parts. A
  group joined partition against partition arrives as columns of the row, and the op carries them.
- ``Graph``: keyed on (user, creator) for its edges (engagement counts summed, the follow flag maximised); the
  combine is global (Leiden), so the Ray executor runs it in one task from the partitions' edge parts.
- ``Accounts``: the viewer's and the creator's attributes and account age (no fit: the users table).
- ``PostSide``: the post feature table's columns as ``post_<name>`` (no fit: the post stage made them; their
  provenance is the post op's that made each one).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl

from engagesim import io
from engagesim.config import COMMUNITY_FOLDS, LEIDEN_MAX_EDGES
from engagesim.features import history
from engagesim.features.lookup import contains, float32_frame, indexed, left_lookup, lookup_columns
from engagesim.features.ops import FeatureOp, Provenance, Snapshot, epoch_us
from engagesim.schema import ENGAGEMENTS

ACCOUNT_COLUMNS = ("follower_count", "following_count", "follower_ratio", "verified")


@dataclass
class ExtraPosts:
    """Posts the snapshot lacks (a request's new posts) as numpy columns: the row of each post_id and the
    columns an impression row carries of it (``post_<name>``)."""

    row: dict[str, int]
    columns: dict[str, np.ndarray]


@dataclass
class Joins:
    """What an impression op's transform knows beyond the rows: rows from ``cutoff_us`` read the apply (training
    total) tables, rows from ``test_from_us`` the recent ones (training + validation period), earlier rows the
    ``history_mode`` ones; posts (and their topics) the snapshot lacks — as a frame (``posts_extra``) or, for
    ``PostSide.arrays`` only, as numpy columns (``extra_posts``)."""

    cutoff_us: int
    history_mode: str = "apply"
    posts_extra: pl.DataFrame | None = None
    topics_extra: pl.DataFrame | None = None
    test_from_us: int | None = None
    extra_posts: ExtraPosts | None = None


class History(FeatureOp):
    provenance = Provenance("LAYER6/Synerise engagement history",
                            "label-derived: other windows or past-only on train; train totals on valid; "
                            "train + validation totals on test")
    sums = tuple(history.SUMS)
    fits = True

    def __init__(self, prefix: str, mode: str = "window", train: pl.DataFrame | None = None,
                 apply: pl.DataFrame | None = None, recent: pl.DataFrame | None = None,
                 latest: pl.DataFrame | None = None) -> None:
        self.prefix, self.mode, self.train, self.apply = prefix, mode, train, apply
        # The held-out snapshots (``extend``): recent = training + validation period, what test rows read;
        # latest = + the test period, what a loaded run serves by default. None in runs saved before them.
        self.recent, self.latest = recent, latest
        self.name = f"history_{prefix}"
        self.keys = (*history.GROUPS[prefix], "window")
        # The pair's parts also carry the follow flag: the Ray executor takes the graph's edges from them.
        self.maxes = (*history.LASTS, "follows") if prefix == "pair" else tuple(history.LASTS)

    def fit_partial(self, events: pl.DataFrame) -> pl.DataFrame:
        """``events``: training impressions through ``history.with_labels_and_windows`` (and the topic)."""
        return history.window_aggregates(events, [self.prefix])[self.prefix]

    def combine(self, parts: Iterable[pl.DataFrame]) -> None:
        aggregates = {self.prefix: pl.concat(list(parts))}
        self.train = history.feature_tables(aggregates, self.mode)[self.prefix]
        self.apply = history.feature_tables(aggregates, "apply")[self.prefix]

    def extend(self, validation: pl.DataFrame | None, test: pl.DataFrame | None) -> None:
        """The held-out snapshots from the held-out periods' partial fits (``fit_partial`` of their events).

        Why: a test row's history used to stop at the training cutoff, so the validation period's events —
        all the history there is of a user who arrived in it — were never seen. On engagesim.foreign's reference
        world a third of the test rows are such users (user_n = 0 on 33 % of test rows, 0.8 % of training
        rows). Validation rows still read the training totals (they choose the models)."""
        keys = history.GROUPS[self.prefix]
        self.recent = history.added(self.apply, validation, keys)
        self.latest = history.added(self.recent, test, keys)

    def columns(self) -> list[str]:
        return history.column_names(self.prefix)

    def transform(self, df: pl.DataFrame, at: Joins) -> pl.DataFrame:
        names = self.columns()
        if all(c in df.columns for c in names):  # joined partition against partition before this map
            return df.select(names)
        return float32_frame(self.arrays(df, at))

    def arrays(self, df: pl.DataFrame, at: Joins) -> dict[str, np.ndarray]:
        names = self.columns()
        if all(c in df.columns for c in names):
            return super().arrays(df, at)
        from engagesim.features.impression import history_arrays

        train = {} if self.train is None else {self.prefix: self.train}
        recent = None if self.recent is None else {self.prefix: self.recent}
        return history_arrays(df, train, {self.prefix: self.apply}, at.cutoff_us, at.history_mode, recent,
                              at.test_from_us)

    def save(self, uri: str, storage, skip: set[str]) -> tuple[dict, dict]:
        if "history" not in skip:
            for snapshot, table in (("apply", self.apply), ("recent", self.recent), ("latest", self.latest)):
                if table is not None:
                    io.write_parquet(io.join(history_uri(uri, self.prefix, snapshot), "part-00000.parquet"), table,
                                     storage)
        return {}, {}

    @classmethod
    def load_group(cls, uri: str, storage, prefix: str, snapshot: Snapshot = "latest") -> History:
        """The group's table a loaded run serves from (as its apply table: serving reads nothing else):
        ``snapshot="cutoff"`` the one the test rows were featurised with (recent), "latest" the one over every
        labelled row; runs saved before those snapshots have the training totals only."""
        single = io.join(uri, f"history_{prefix}.parquet")  # runs from before the partitioned plane
        if io.exists(single, storage):
            return cls(prefix, "apply", None, io.read_parquet(single, storage))
        from engagesim.features.state import read_parts

        names = ("latest", "recent") if snapshot == "latest" else ("recent",)
        at = next((a for n in names if io.exists(a := history_uri(uri, prefix, n), storage)),
                  history_uri(uri, prefix))
        return cls(prefix, "apply", None, read_parts(at, storage))

    def index_for_lookups(self) -> None:
        indexed(self.apply, history.GROUPS[self.prefix])


def history_uri(uri: str, prefix: str, snapshot: str = "apply") -> str:
    """Where a group's table of one snapshot lives (apply: training totals; recent, latest: ``History.extend``):
    Parquet parts, one per key-hash partition (pipeline/partitioned.py)."""
    return io.join(uri, "history", prefix, snapshot)


class Graph(FeatureOp):
    name = "graph"
    provenance = Provenance("CF / Jaccard / Leiden on training interactions",
                            "label-derived: fit on train split only; CF leaves the row's own (user, creator) edge out, "
                            "and so do the community columns with features.community_folds >= 2")
    keys = ("user_id", "creator_id")
    sums = tuple(f"c_{e}" for e in ENGAGEMENTS)
    maxes = ("follows",)
    fits = True

    def __init__(self, jaccard_k: int = 20, seed: int = 0, model=None, max_edges: int | None = LEIDEN_MAX_EDGES,
                 community_folds: int = COMMUNITY_FOLDS) -> None:
        self.jaccard_k, self.seed, self.model, self.max_edges = jaccard_k, seed, model, max_edges
        self.community_folds = community_folds

    def fit_partial(self, events: pl.DataFrame) -> pl.DataFrame:
        from engagesim.features.graph_fit import graph_edges

        return graph_edges(history.window_aggregates(events, ["pair"])["pair"])

    def combine(self, parts: Iterable[pl.DataFrame]) -> None:
        from engagesim.features.graph_fit import fit_graph_from_pairs

        self.model = fit_graph_from_pairs(list(parts), self.jaccard_k, self.seed, self.max_edges,
                                          community_folds=self.community_folds)

    def columns(self) -> list[str]:
        from engagesim.features.graph import GRAPH_COLUMNS

        return list(GRAPH_COLUMNS)

    def transform(self, df: pl.DataFrame, at: Joins) -> pl.DataFrame:
        return self.model.features(df["user_id"], df["creator_id"])

    def arrays(self, df: pl.DataFrame, at: Joins) -> dict[str, np.ndarray]:
        return self.model.feature_arrays(df["user_id"], df["creator_id"])

    def save(self, uri: str, storage, skip: set[str]) -> tuple[dict, dict]:
        if self.model is not None and "graph" not in skip:
            self.model.save(io.join(uri, "graph"), storage)
        return {}, {}

    @classmethod
    def load(cls, uri: str, storage, meta: dict, arrays: dict, snapshot: Snapshot) -> Graph:
        from engagesim.features.graph import GraphModel

        return cls(model=GraphModel.load(io.join(uri, "graph"), storage))

    def index_for_lookups(self) -> None:
        indexed(self.model.users.table, "key")
        indexed(self.model.creators.table, "key")


class Accounts(FeatureOp):
    """The viewer's (``user_``) and the creator's (``creator_``) account attributes and age at the impression."""

    name = "accounts"
    provenance = Provenance("account attributes; age as in the Adobe date-time features", "row/account-local: no labels")

    def __init__(self, users: pl.DataFrame | None = None) -> None:
        self.users = users  # ``post_ops.user_attributes`` of the users table
        self._table: pl.DataFrame | None = None  # + creation in epoch µs (``_lookup``)
        self._indexed = False

    def columns(self) -> list[str]:
        return [f"{p}_{c}" for p in ("user", "creator") for c in (*ACCOUNT_COLUMNS, "account_age_days")]

    def transform(self, df: pl.DataFrame, at: Joins) -> pl.DataFrame:
        return float32_frame(self.arrays(df, at))

    def arrays(self, df: pl.DataFrame, at: Joins) -> dict[str, np.ndarray]:
        table = self._lookup()
        now = epoch_us(df.get_column("impression_at"))
        cols: dict[str, np.ndarray] = {}
        for prefix, key in (("user", "user_id"), ("creator", "creator_id")):
            # The key as a one-column frame without a select (a select's expression costs ~0.2 ms at one row).
            got = lookup_columns(table, "user_id", df.get_column(key).alias("user_id").to_frame(),
                                 [*ACCOUNT_COLUMNS, "_us"], dict.fromkeys([*ACCOUNT_COLUMNS, "_us"], np.nan))
            cols.update({f"{prefix}_{c}": got[c] for c in ACCOUNT_COLUMNS})
            # Whole seconds, as polars' Duration.total_seconds gives them (truncated), then days.
            cols[f"{prefix}_account_age_days"] = np.trunc((now - got["_us"]) / 1e6) / 86400.0
        return cols

    def _lookup(self) -> pl.DataFrame:
        """The users table with account creation as µs since the epoch, made once per op (indexed in a loaded run)."""
        if self._table is None:
            table = self.users.with_columns(pl.col("_user_created").dt.epoch("us").alias("_us"))
            self._table = indexed(table, "user_id") if self._indexed else table
        return self._table

    def save(self, uri: str, storage, skip: set[str]) -> tuple[dict, dict]:
        if self.users is not None and "users" not in skip:
            io.write_parquet(io.join(uri, "users.parquet"), self.users, storage)
        return {}, {}

    @classmethod
    def load(cls, uri: str, storage, meta: dict, arrays: dict, snapshot: Snapshot) -> Accounts:
        return cls(io.read_parquet(io.join(uri, "users.parquet"), storage))

    def index_for_lookups(self) -> None:
        self._indexed, self._table = True, None


class PostSide(FeatureOp):
    """The post table's features on each impression (``post_<name>``), and each post's topic for the history.

    ``posts`` None: the rows already carry the columns (a hash join on post_id before this map)."""

    name = "posts"
    provenance = Provenance("post features (each column's post op)", "as the post column")

    def __init__(self, posts: pl.DataFrame | None, topics: pl.DataFrame | None, names: list[str]) -> None:
        self.posts, self.topics, self.names = posts, topics, [n for n in names if n != "post_id"]
        self._names: list[str] = []
        self._names_of: pl.DataFrame | None = None  # the snapshot ``_names`` were found in (the pipeline sets posts)

    def columns(self) -> list[str]:
        return self.names

    def transform(self, df: pl.DataFrame, at: Joins) -> pl.DataFrame:
        if self.posts is None:
            return df.select(self.names)
        return left_lookup(df.select("post_id"), self.posts, "post_id", at.posts_extra, with_keys=False)

    def arrays(self, df: pl.DataFrame, at: Joins) -> dict[str, np.ndarray]:
        """The numeric post columns of each row's post (float64, NaN: null or no such post): from the snapshot by
        ``lookup_columns``, a post it lacks from ``at.extra_posts`` or ``at.posts_extra`` (a request's new post) by
        position — no frame per request (``transform``'s lookup and its conversion cost 1.7 ms a served row; this
        0.4)."""
        if self.posts is None:
            return super().arrays(df, at)
        names = self._numeric_names()
        keys = df.get_column("post_id").to_frame()
        got = lookup_columns(self.posts, "post_id", keys, names, dict.fromkeys(names, np.nan))
        extra = at.posts_extra
        if at.extra_posts is not None and names:
            ids = keys.get_column("post_id")
            new = ~contains(self.posts, "post_id", ids).to_numpy()
            if new.any():
                get = at.extra_posts.row.get
                rows = np.array([get(k, -1) for k in ids.filter(pl.Series(new)).to_list()], dtype=np.int64)
                for name in names:  # row -1: no such post, NaN (one past the last row)
                    column = np.append(np.asarray(at.extra_posts.columns[name], dtype=np.float64), np.nan)
                    got[name][new] = column[rows]
        elif extra is not None and extra.height and names:
            ids = keys.get_column("post_id")
            new = ~contains(self.posts, "post_id", ids).to_numpy()
            if new.any():
                position = {k: i for i, k in enumerate(extra.get_column("post_id").to_list())}
                rows = np.array([position.get(k, -1) for k in ids.filter(pl.Series(new)).to_list()], dtype=np.int64)
                # One conversion of the few new posts (nulls → NaN; booleans and integers exactly as float64).
                values = np.vstack([extra.select(pl.col(names).cast(pl.Float64)).to_numpy(),
                                    np.full((1, len(names)), np.nan)])[rows]  # row -1: no such post, all NaN
                for j, name in enumerate(names):
                    got[name][new] = values[:, j]
        return got

    def save(self, uri: str, storage, skip: set[str]) -> tuple[dict, dict]:
        if self.posts is not None and "posts" not in skip:
            io.write_parquet(io.join(uri, "posts.parquet"), self.posts, storage)
        if self.topics is not None and "topics" not in skip:
            io.write_parquet(io.join(uri, "topics.parquet"), self.topics, storage)
        return {}, {}

    @classmethod
    def load(cls, uri: str, storage, meta: dict, arrays: dict, snapshot: Snapshot) -> PostSide:
        from engagesim.features.post_ops import table_or_parts  # one file, or the Ray executor's parts

        posts = table_or_parts(uri, "posts", storage)
        return cls(posts, table_or_parts(uri, "topics", storage) if meta["topics"] else None, posts.columns)

    def _numeric_names(self) -> list[str]:
        """The snapshot's numeric columns (what ``arrays`` gives), found once per snapshot."""
        if self._names_of is not self.posts:
            self._names, self._names_of = [n for n, d in self.posts.schema.items()
                                           if n != "post_id" and (d.is_numeric() or d == pl.Boolean)], self.posts
        return self._names

    def index_for_lookups(self) -> None:
        indexed(self.posts, "post_id")
        indexed(self.topics, "post_id")


def impression_ops(groups: Iterable[str], history_mode: str, jaccard_k: int, seed: int, users: pl.DataFrame | None,
                   posts: pl.DataFrame | None, topics: pl.DataFrame | None, post_names: list[str],
                   leiden_max_edges: int | None = LEIDEN_MAX_EDGES, community_folds: int = COMMUNITY_FOLDS) -> list[FeatureOp]:
    """The ops of an impression table in column order (history groups in ``history.GROUPS`` order)."""
    return [*(History(p, history_mode) for p in history.GROUPS if p in set(groups)),
            Graph(jaccard_k, seed, max_edges=leiden_max_edges, community_folds=community_folds),
            Accounts(users), PostSide(posts, topics, post_names)]


OPS_BY_NAME: dict[str, type[FeatureOp]] = {"graph": Graph, "accounts": Accounts, "posts": PostSide}

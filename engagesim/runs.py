"""A finished run as a Python object: ``engagesim.load_run(RUN_DIR)`` for notebooks, scoring and Serve.

``predict`` takes raw contract rows (posts, or impressions with their posts),
featurises them with the run's saved feature state and scores them with its
saved models — the same functions the pipeline used for its validation rows,
so a served prediction equals the evaluated one.
"""

from __future__ import annotations

import datetime as dt
from functools import cached_property
from typing import Any, get_args

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import io
from engagesim.config import AppConfig
from engagesim.errors import UserError
from engagesim.features.impression import impression_arrays, join_impressions, post_side_columns
from engagesim.features.impression_ops import ExtraPosts, Joins
from engagesim.features.lookup import absent
from engagesim.features.ops import numeric_arrays
from engagesim.features.post import post_row_features
from engagesim.features.state import ImpressionState, PostState, Snapshot
from engagesim.models.bundle import ImpressionModels, Members, PostModels
from engagesim.schema import ENGAGEMENTS, INTERACTIONS, POSTS, request_post_id

# Impression rows past every training event: the whole row is looked up in the "apply" snapshot.
ALWAYS_APPLY = -(2**62)


def _is_pandas(rows: Any) -> bool:
    return not isinstance(rows, (pa.Table, pl.DataFrame)) and hasattr(rows, "to_dict") and hasattr(rows, "columns")


def _as_arrow(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pl.DataFrame):
        return rows.to_arrow()
    if _is_pandas(rows):
        return pa.Table.from_pandas(rows, preserve_index=False)
    if isinstance(rows, list):
        return pa.Table.from_pylist(rows)
    raise TypeError(f"expected a pyarrow Table, polars/pandas DataFrame or list of dicts, not {type(rows).__name__}")


def _post_rows(posts: Any) -> pa.Table:
    """Posts as the contract has them, from either shape: contract rows (post_id, author_id, username, …) or
    the request shape HTTP takes (``account``, optional ``post_id`` / ``username``): ``account`` is the
    author, ``username`` defaults to it, and a missing ``post_id`` is the request id ``/v1/predict`` gives the
    same post (``schema.request_post_id``)."""
    table = _as_arrow(posts)
    names = table.column_names
    if "account" in names:
        if "author_id" in names:
            raise ValueError("give the author as `account` (the request shape) or `author_id`, not both")
        table = table.rename_columns(["author_id" if n == "account" else n for n in names])
        if "username" not in names:
            table = table.append_column("username", table.column("author_id"))
    if "post_id" not in table.column_names or table.column("post_id").null_count:
        given = table.column("post_id").to_pylist() if "post_id" in table.column_names else [None] * table.num_rows
        created = pc.cast(table.column("created_at"), POSTS.field("created_at").type).to_pylist()
        ids = [pid or request_post_id(a, t, x) for pid, a, t, x in
               zip(given, table.column("author_id").to_pylist(), created, table.column("text").to_pylist())]
        table = (table.drop_columns(["post_id"]) if "post_id" in table.column_names else table).append_column(
            "post_id", pa.array(ids, pa.string()))
    return table


def _like(rows: Any, result: pa.Table) -> Any:
    """A pandas DataFrame out when one went in; a pyarrow Table otherwise."""
    return result.to_pandas() if _is_pandas(rows) else result


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Fill optional contract columns the caller left out with nulls, then cast to the contract."""
    if table.schema.equals(schema, check_metadata=True):  # a served request (serve.api.to_tables): 63 + 36 µs -> 1
        return table
    given = set(table.column_names)  # once: ``column_names`` is a new list on every access
    for f in schema:
        if f.name not in given:
            if not f.nullable and f.name not in ("media", "follows_creator"):
                raise ValueError(f"missing required column {f.name!r}")
            fill = (pa.array([[]] * table.num_rows, type=f.type) if f.name == "media"
                    else pa.array([False] * table.num_rows) if f.name == "follows_creator"
                    else pa.nulls(table.num_rows, f.type))
            table = table.append_column(f.name, fill)
    # A column already of its contract type is taken as it is: a cast per column was most of a served post's 0.35 ms.
    return pa.table([c if (c := table.column(f.name)).type == f.type else pc.cast(c, f.type) for f in schema],
                    schema=schema)


class FeaturisedPosts:
    """Posts featurised for scoring (``LoadedRun.featurise_posts``): the rows the post ops read, and two forms of
    their features, each made from those rows when first read — the numeric columns as numpy (``PostState.arrays``:
    what members that take arrays read) and the feature frame (``PostState.transform``: members that read text,
    explanations). Both are every row's apply version; ``tests/test_run_api.py`` holds their scores equal."""

    def __init__(self, rows: pl.DataFrame, state: PostState, new_accounts: pl.DataFrame | None = None):
        self.rows, self._state, self._new_accounts = rows, state, new_accounts

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        return self._state.arrays(self.rows, self._new_accounts)

    @cached_property
    def frame(self) -> pl.DataFrame:
        return self._state.transform(self.rows, self._new_accounts)

    def extend(self, at: Joins, unknown: list[str], state: ImpressionState) -> None:
        """Hand the ``unknown`` posts (those the snapshot lacks) to ``at`` as numpy columns, as ``PostSide.arrays``
        reads them; an unknown post without a row here is the same error as on the frame path."""
        ids = self.rows.get_column("post_id").to_list()
        row: dict[str, int] = {}
        for i, post in enumerate(ids):
            row.setdefault(post, i)  # a post given twice: its first row, as the frame path's unique()
        missing = [post for post in unknown if post not in row]
        if missing:
            raise ValueError(f"no post row for post_id {missing[0]!r}")
        names = post_side_columns(list(self.arrays))
        at.extra_posts = ExtraPosts(row, {names[c]: v for c, v in self.arrays.items() if c in names})
        if state.topics is not None and "text_cluster" in self.arrays:
            first = [row[post] for post in unknown]
            at.topics_extra = pl.DataFrame({"post_id": pl.Series(unknown, dtype=pl.String),
                                            "topic": pl.Series(self.arrays["text_cluster"][first])
                                            .cast(state.topics.schema["topic"])})


class LoadedRun:
    def __init__(self, uri: str, storage=None, snapshot: Snapshot = "latest"):
        self.uri = uri
        self.snapshot = snapshot
        self.manifest: dict[str, Any] = io.read_json(io.join(uri, "manifest.json"), storage)
        self.config = AppConfig.model_validate(self.manifest["config"])
        self.storage = storage or self.config.storage

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def path(self, *parts: str) -> str:
        return io.join(self.uri, *parts)

    # -- loaded lazily: a post-only run has no impression state ------------------------------------
    @cached_property
    def post_state(self) -> PostState:
        state = PostState.load(self.path("features", "state", "posts"), self.storage, self.snapshot)
        state.index_for_lookups()
        return state

    @cached_property
    def impression_state(self) -> ImpressionState:
        state = ImpressionState.load(self.path("features", "state", "impressions"), self.storage, self.snapshot)
        state.index_for_lookups()
        return state

    @cached_property
    def post_models(self) -> PostModels:
        return PostModels(self.path("models", "post"))

    @cached_property
    def impression_models(self) -> ImpressionModels:
        return ImpressionModels(self.path("models", "impression"))

    @property
    def has_impression_models(self) -> bool:
        return bool(self.impression_models.members)

    @cached_property
    def _encoders(self) -> list:
        from engagesim.embed.actors import encoder_specs

        return [encoder(**kwargs) for encoder, kwargs in encoder_specs(self.config.embed, self.storage)]

    # -- featurise -------------------------------------------------------------------------------
    def post_features(self, posts: Any, new_accounts: pl.DataFrame | None = None) -> pl.DataFrame:
        """Raw posts (contract columns; likes optional) → the post feature table the models read.

        ``new_accounts``: attributes (author_id, follower_count, …) of accounts the run never saw.
        """
        return self.post_state.transform(self._post_rows(posts), new_accounts)

    def featurise_posts(self, posts: Any, new_accounts: pl.DataFrame | None = None) -> FeaturisedPosts:
        """``post_features`` as numpy columns where the members take them, the frame only where something reads
        it: what ``predict`` and Serve score posts from. ``score_post_features`` and ``score_impressions`` (as
        ``featurised_posts``) take it."""
        return FeaturisedPosts(self._post_rows(posts), self.post_state, new_accounts)

    def _post_rows(self, posts: Any) -> pl.DataFrame:
        """Raw posts → the rows the post ops read: row-local features, then the encoders' columns."""
        rows = post_row_features(_conform(_post_rows(posts), POSTS))
        for encoder in self._encoders:
            rows = encoder(rows)
        # One chunk per column: polars mis-reads a sliced fixed-size-list column that has a validity mask
        # (what to_batches makes of columns with different chunk layouts).
        return pl.from_arrow(rows.combine_chunks())

    def impression_features(self, impressions: Any, posts: Any | None = None,
                            featurised_posts: pl.DataFrame | FeaturisedPosts | None = None) -> pa.Table:
        """Raw impressions (+ the raw posts they show, for posts the run never saw) → impression features.

        Posts the run knows are looked up in its snapshot (as in the batch pipeline); unknown posts are
        featurised from ``posts`` (or taken from ``featurised_posts`` when the caller already has them);
        an unknown post without a row is an error.
        """
        table, at = self._impression_inputs(impressions, posts, featurised_posts)
        state = self.impression_state
        return join_impressions(table, state.ops, state.origin_us, state.window_hours, at)

    def _impression_inputs(self, impressions: Any, posts: Any | None,
                           featurised_posts: pl.DataFrame | FeaturisedPosts | None,
                           arrays: bool = False) -> tuple[pa.Table, Joins]:
        """The conformed impression rows and what their ops' joins need: the posts the snapshot lacks (``arrays``:
        as numpy columns where ``featurised_posts`` has them, for ``PostSide.arrays``)."""
        table = _conform(_as_arrow(impressions), INTERACTIONS)
        state = self.impression_state
        at = Joins(ALWAYS_APPLY)
        unknown_ids = absent(state.posts, "post_id", table.column("post_id").to_pylist())  # first-seen order
        if unknown_ids:
            if posts is None and featurised_posts is None:
                raise ValueError(f"{len(unknown_ids)} post(s) unknown to the run and no posts given, "
                                 f"e.g. {unknown_ids[0]!r}")
            if arrays and featurised_posts is None:  # raw posts: featurised to numpy columns, as Serve's
                featurised_posts = self.featurise_posts(posts)
            if isinstance(featurised_posts, FeaturisedPosts):
                if arrays:
                    featurised_posts.extend(at, unknown_ids, state)
                    return table, at
                featurised_posts = featurised_posts.frame
            unknown = pl.Series(unknown_ids, dtype=pl.String)
            new = featurised_posts if featurised_posts is not None else self.post_features(posts)
            given = new["post_id"].to_list()
            if len(set(given)) != len(given) or set(given) != set(unknown_ids):  # else: exactly the new posts
                new = new.filter(pl.col("post_id").is_in(unknown.implode())).unique("post_id", maintain_order=True)
                missing = unknown.filter(~unknown.is_in(new["post_id"].implode()))
                if len(missing):
                    raise ValueError(f"no post row for post_id {missing[0]!r}")
            # Looked up below the snapshot's rows, as if concatenated to them (features/lookup.py): the
            # snapshot keeps its index, never re-hashed for one new post. One select: the columns an impression
            # row carries (impression_post_columns), named and ordered as the snapshot's.
            source = {name: column for column, name in post_side_columns(new.columns).items()}
            at.posts_extra = new.select([pl.col(source[c]).alias(c) for c in state.posts.columns])
            if state.topics is not None and "post_text_cluster" in source:
                at.topics_extra = new.select("post_id", pl.col(source["post_text_cluster"]).alias("topic"))
        return table, at

    # -- score -----------------------------------------------------------------------------------
    def score_post_features(self, table: pa.Table | pl.DataFrame | FeaturisedPosts, members: Members = "all") -> pa.Table:
        """Post features → the served log1p(likes), expected likes with an 80 % interval, and a column per member
        (``members="served"``: only the members the served ensemble reads; "all": every member the run kept).

        A polars frame (``post_features``' output) is read as numpy columns where every member to run takes them
        (``numeric_arrays``; no Arrow table of ~100 columns built per request); ``FeaturisedPosts``
        (``featurise_posts``: ``predict`` and Serve) gives them without a frame."""
        if isinstance(table, FeaturisedPosts):
            return self._post_scores(table.rows.get_column("post_id").to_arrow(), self.post_predictions(table, members))
        if isinstance(table, pl.DataFrame) and self.post_models.takes_arrays(members):
            ids, inputs = table.get_column("post_id").to_arrow(), numeric_arrays(table)
        else:
            table = _as_arrow(table)
            ids, inputs = table.column("post_id"), table
        return self._post_scores(ids, self.post_models.predict(inputs, members))

    def _post_scores(self, ids: pa.Array, preds: dict[str, np.ndarray]) -> pa.Table:
        return pa.table({"post_id": ids, **self.post_score_columns(preds)})

    def post_score_columns(self, preds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``score_post_features``' columns but the ids, from the members' predictions (``PostModels.predict``)."""
        low, high = self.post_models.interval(preds["ensemble"])
        cols = {"log1p_likes": preds["ensemble"], "expected_likes": np.expm1(preds["ensemble"]).astype(np.float32),
                "likes_low": low.astype(np.float32), "likes_high": high.astype(np.float32)}
        cols.update({f"log1p_likes_{k}": v for k, v in preds.items() if k != "ensemble"})
        return cols

    def post_predictions(self, posts: FeaturisedPosts, members: Members = "all") -> dict[str, np.ndarray]:
        """The members' and the ensemble's log1p(likes) of featurised posts: ``score_post_features`` without its
        table (what a Serve replica answers from)."""
        if self.post_models.takes_arrays(members):
            return self.post_models.predict(posts.arrays, members)
        return self.post_models.predict(_as_arrow(posts.frame), members)

    def score_impression_features(self, table: pa.Table | pl.DataFrame, members: Members = "all") -> pa.Table:
        """Impression features → P(engagement) of the served ensemble, and of each member (``members`` as above)."""
        table = _as_arrow(table)
        return _impression_scores(table, self.impression_models.predict(table, members))

    def score_impressions(self, impressions: Any, posts: Any | None = None,
                          featurised_posts: pl.DataFrame | FeaturisedPosts | None = None,
                          members: Members = "all") -> pa.Table:
        """Raw impressions → ``score_impression_features(impression_features(…))``, the features as numpy columns
        (``impression_arrays``) where every member to run takes them: no feature table is built. What ``predict``
        and Serve call."""
        return _impression_scores(*self.impression_predictions(impressions, posts, featurised_posts, members))

    def impression_predictions(self, impressions: Any, posts: Any | None = None,
                               featurised_posts: pl.DataFrame | FeaturisedPosts | None = None,
                               members: Members = "all") -> tuple[pa.Table, dict[str, np.ndarray]]:
        """``score_impressions`` without its table: the rows (conformed, or their feature table) and each member's
        and the ensemble's (n, 4) P(engagement) (what a Serve replica answers from)."""
        models = self.impression_models
        if not models.takes_arrays(members):
            features = self.impression_features(impressions, posts, featurised_posts)
            return features, models.predict(features, members)
        table, at = self._impression_inputs(impressions, posts, featurised_posts, arrays=True)
        state = self.impression_state
        arrays = impression_arrays(table, state.ops, state.origin_us, state.window_hours, at)
        return table, models.predict(arrays, members)

    def predict(self, rows: Any, posts: Any | None = None, members: Members = "all") -> Any:
        """Raw rows → predictions. Impression rows (user_id, post_id, impression_at, …) give P(engagement);
        post rows give expected likes with an 80 % interval, and (``members="all"``) every member's.

        Posts come as contract rows or in the request shape of ``/v1/predict`` (``account``, ``text``,
        ``created_at``; ``post_id`` optional, then the id HTTP would give). A pandas DataFrame in gives a pandas
        DataFrame out; anything else a pyarrow Table. ``members="served"``: only the served ensemble's members are
        computed and returned (the ensemble's columns are the same; the run's other members cost as much)."""
        table = _as_arrow(rows)
        impressions = {"user_id", "impression_at"} <= set(table.column_names)
        if table.num_rows == 0:  # encoders and joins want rows; the answer is the empty table of the right shape
            return _like(rows, self._empty_result(impressions, members))
        if impressions:
            return _like(rows, self.score_impressions(table, posts, members=members))
        return _like(rows, self.score_post_features(self.featurise_posts(table), members))

    def _empty_result(self, impressions: bool, members: Members) -> pa.Table:
        when = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
        probe = {"post_id": "_schema_probe", "author_id": "_", "username": "_", "text": "", "created_at": when,
                 "media": []}
        if not impressions:
            return self.predict([probe], members=members).slice(0, 0)
        viewer = {"user_id": "_", "post_id": "_schema_probe", "creator_id": "_", "impression_at": when}
        return self.predict([viewer], posts=[probe], members=members).slice(0, 0)


def _impression_scores(rows: pa.Table, preds: dict[str, np.ndarray]) -> pa.Table:
    """The rows' ids and P(engagement) of the served ensemble (``p_<engagement>``) and of each member
    (``p_<engagement>_<member>``). Ids as large strings whichever path scored them (a feature table comes out of
    polars with them)."""
    cols: dict[str, Any] = {k: rows.column(k).cast(pa.large_string()) for k in ("user_id", "post_id")}
    cols["impression_at"] = rows.column("impression_at")
    for name, p in preds.items():
        suffix = "" if name == "ensemble" else f"_{name}"
        cols.update({f"p_{e}{suffix}": p[:, i] for i, e in enumerate(ENGAGEMENTS)})
    return pa.table(cols)


class RunNotFound(UserError, FileNotFoundError):
    """The path given as a run is not one."""


def load_run(uri: str, storage=None, snapshot: Snapshot = "latest") -> LoadedRun:
    """Open a run directory (local or s3://) written by the behaviour job.

    ``snapshot="latest"`` (serving, scoring) looks posts up in target encodings over every labelled row of the
    run; ``"cutoff"`` in those its validation and test rows were featurised with, so that predicting those rows
    reproduces the evaluation exactly. Scoring a run's own held-out rows under "latest" sees their labels."""
    if snapshot not in get_args(Snapshot):
        raise UserError(f"snapshot={snapshot!r}: use one of {', '.join(get_args(Snapshot))}")
    check_run(uri, storage)
    return LoadedRun(uri, storage, snapshot)


def check_run(uri: str, storage=None) -> None:
    """A run directory, or one line saying it is not (before a service or a job is started on it)."""
    if not io.exists(io.join(uri, "manifest.json"), storage):
        raise RunNotFound(f"{uri} is not a run directory (no manifest.json); runs are the directories "
                          "`engagesim pipeline behaviour` prints (under output_root, runs/ by default)")
